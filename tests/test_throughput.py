"""FLOPs per token by hand, the step-time fit, and predicted vs measured throughput on the H100 records."""

import pytest

from qlora_bench.calibration import nonneg_least_squares
from qlora_bench.estimate.throughput import attention_flops_per_token, flops, matmul_params_per_token, mfu
from qlora_bench.profiles import resolve_gpu
from qlora_bench.results import RESULTS_DIR, load_records
from qlora_bench.settings import Settings
from qlora_bench.validate import validate


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


def test_nonneg_least_squares_recovers_coefficients():
    xs = [[1, 2, 0], [2, 1, 1], [3, 0, 2], [1, 1, 1], [0, 3, 1]]
    truth = [0.5, 2.0, 1.5]
    y = [sum(a * b for a, b in zip(x, truth)) for x in xs]
    assert nonneg_least_squares(xs, y) == pytest.approx(truth)
    # a coefficient that would come out negative is dropped (clamped at 0)
    y2 = [sum(a * b for a, b in zip(x, [1.0, -0.1, 0.0])) for x in xs]
    assert min(nonneg_least_squares(xs, y2)) >= 0


def test_predicted_throughput_within_the_noise_of_short_steps():
    """All committed steps are < 1 s, where repeats of one configuration varied by up to 30 % (shared/
    measurements README; the 8B QLoRA repeats here span 2,523-3,519 tokens/s): predictions within 35 %."""
    rows, summaries = validate(load_records(RESULTS_DIR / "h100" / "hf-stack-shared.jsonl"))
    errs = [r.throughput["error"] for r in rows if r.throughput.get("error") is not None]
    assert len(errs) >= 10 and max(abs(e) for e in errs) <= 0.35
    assert summaries["all"].long_step_records == 0  # the fitted records hold no step of 1 s or more


def test_throughput_only_records_are_validated_out_of_sample():
    """The shared throughput-only records (memory withheld) are checked for tokens/s only, as held-out rows:
    they hold the steps of at least 1 s the fitted records lack (their error is issue 11's to bring down)."""
    rows, summaries = validate(load_records(RESULTS_DIR / "h100" / "throughput-shared.jsonl"))
    assert rows and all(not r.has_memory and r.held_out and r.throughput.get("error") is not None for r in rows)
    assert summaries["all"].long_step_records >= 1 and summaries["all"].n_memory == 0


def test_plan_predicts_throughput_only_for_known_gpus(llama8b):
    from qlora_bench.plan import plan

    p = plan(llama8b, Settings(), resolve_gpu("h100"), epoch_tokens=10_000_000)
    assert p.tokens_per_sec > 0 and p.epoch_seconds == pytest.approx(10_000_000 / p.tokens_per_sec)
    assert plan(llama8b, Settings(), resolve_gpu("24gb")).tokens_per_sec is None
