"""FLOPs per token by hand, the step-time fit, and predicted vs measured throughput on the H100 records."""

import pytest

from qlora_bench.estimate.throughput import attention_flops_per_token, flops, matmul_params_per_token, mfu
from qlora_bench.profiles import resolve_gpu
from qlora_bench.results import load_records
from qlora_bench.settings import Settings


def test_flops_per_token_by_hand(llama8b):
    n = 8_030_261_248 - 128256 * 4096 - 65 * 4096  # all weights but the embedding and norms: linears + lm_head
    assert matmul_params_per_token(llama8b) == n
    a = 2 * 2048 * 32 * 128 * 32  # causal: 2 * seq * heads * head_dim per layer
    assert attention_flops_per_token(llama8b, 2048) == a
    full = flops(llama8b, Settings(method="full", gradient_checkpointing=False))
    assert full.useful_per_token == full.hardware_per_token == 6 * n + 3 * a
    lora = flops(llama8b, Settings(method="lora"))
    adapters = 41_943_040
    assert lora.useful_per_token == 4 * n + 3 * a + 6 * adapters
    recompute = 2 * (n - 128256 * 4096) + a + 2 * adapters  # gradient checkpointing: the layers' forward again
    assert lora.hardware_per_token == lora.useful_per_token + recompute
    q = flops(llama8b, Settings())
    assert q.dequant_bytes_per_step == 6_979_321_856 * 4.5 * 3  # forward, recompute, backward


def test_mfu_of_a_measured_run():
    rec = next(r for r in load_records() if r.id == "llama-3.1-8b/full/adamw_torch_fused/bs1x2048/gc")
    m, h = mfu(rec.model_spec(), rec.settings, resolve_gpu("h100"), rec.measured["tokens_per_sec"])
    assert 0.2 < m < h < 0.6  # 6N per token at ~6.7k tok/s on 989 TFLOP/s


def test_plan_predicts_throughput_only_for_known_gpus(llama8b):
    from qlora_bench.plan import plan

    p = plan(llama8b, Settings(), resolve_gpu("h100"), epoch_tokens=10_000_000)
    assert p.tokens_per_sec > 0 and p.epoch_seconds == pytest.approx(10_000_000 / p.tokens_per_sec)
    assert plan(llama8b, Settings(), resolve_gpu("24gb")).tokens_per_sec is None
