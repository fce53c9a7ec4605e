"""Estimator figures derived by hand, with the arithmetic written out, for three configurations.

Overheads that are calibrated (cuBLAS workspace) are read from the committed calibration, never typed in.
Where the committed H100 records measured the same static quantity, the hand figure is checked against it too.
"""

import pytest

from qlora_bench.estimate import estimate
from qlora_bench.estimate.overhead import overheads
from qlora_bench.results import load_records
from qlora_bench.settings import Settings

V, H, I, L, KV = 128256, 4096, 14336, 32, 1024  # noqa: E741  (Llama-3.1-8B)


def _record(record_id):
    return next(r for r in load_records() if r.id == record_id)


def test_llama8b_qlora_default(llama8b):
    e = estimate(llama8b, Settings())  # nf4 + double quant, r=16 all-linear, paged_adamw_8bit, gc, 1 x 2048
    # quantized linears per layer: q,o 4096x4096; k,v 4096x1024; gate,up,down 4096x14336
    per_layer = 2 * H * H + 2 * H * KV + 3 * H * I
    assert per_layer == 218_103_808
    packed = L * per_layer // 2
    assert e.phases["loss"]["weights_4bit"] == packed == 3_489_660_928
    # double quant: one uint8 per 64-block, one fp32 per 256 blocks, per tensor 1 KiB code + 4 B offset + 64 B NF4 code
    blocks = L * per_layer // 64
    nested = L * (2 * (H * H // 64 // 256) + 2 * (H * KV // 64 // 256) + 3 * (H * I // 64 // 256))
    constants = blocks + 4 * nested + 7 * L * (1024 + 4 + 64)
    assert e.phases["loss"]["quant_constants"] == constants == 111_000_448
    # embeddings + lm_head (untied) + 65 norms, cast to fp32 by prepare_model_for_kbit_training
    dense = (2 * V * H + (2 * L + 1) * H) * 4
    assert e.phases["loss"]["weights_dense"] == dense == 4_203_757_568
    # fp32 adapters: r * (9h + 2 kv + 3i) per layer
    adapters = 16 * (9 * H + 2 * KV + 3 * I) * L * 4
    assert e.phases["loss"]["lora_adapters"] == adapters == 167_772_160
    # paged 8-bit AdamW: tensors >= 1e5 elements (gate B, up B, down A: 229,376 each) are paged (2 x uint8);
    # the rest keep uint8 states on the device; fp32 absmax per 256 elements for every tensor, both states
    paged = L * 3 * (16 * I) * 2
    assert e.paged_bytes == paged == 44_040_192
    device_states = (adapters // 4 - paged // 2) * 2 + (adapters // 4 // 256) * 2 * 4
    assert e.phases["loss"]["optimizer_states"] == device_states == 41_156_608
    # the peak is the cross-entropy backward: checkpoints (fp32 hidden per layer), 12 B per logit,
    # final norm + lm_head input, and the bf16 autocast copy of the fp32 lm_head
    tokens = 2048
    ckpt = L * tokens * H * 4
    loss = tokens * V * 12 + tokens * H * (4 + 2)
    lm_head_copy = V * H * 2
    assert e.phase_model_peak == "loss"
    expected = packed + constants + dense + adapters + device_states + ckpt + loss + lm_head_copy
    assert e.phase_peak_bytes == expected + overheads().cublas_workspace
    # the static part equals what the H100 run allocated as parameters (read from the committed record)
    rec = _record("llama-3.1-8b/qlora/r16/nf4-dq/paged_adamw_8bit/bs1x2048/gc").measured
    assert rec["param_bytes_by_dtype_after_build"]["uint8"] == packed
    assert rec["param_bytes_by_dtype_after_wrap"]["float32"] == dense + adapters
    assert rec["optimizer_state_paged_bytes"] == paged
    # the simulated step holds the same tensors, each rounded up to the allocator's 512-byte blocks
    for k in ("weights_4bit", "quant_constants", "weights_dense", "lora_adapters", "optimizer_states"):
        assert 0 <= e.components[k] - e.phases["loss"][k] <= 0.001 * e.phases["loss"][k]


def test_llama8b_lora(llama8b):
    e = estimate(llama8b, Settings(method="lora", optimizer="adamw_torch_fused"))
    weights = 8_030_261_248 * 2  # bf16
    adapters = 41_943_040 * 4
    # fused torch AdamW: exp_avg + exp_avg_sq fp32 per adapter param + a 4-byte step tensor per tensor (448)
    states = 41_943_040 * 8 + 448 * 4
    ckpt = L * 2048 * H * 2  # bf16 hidden states
    loss = 2048 * V * 12 + 2048 * H * (4 + 2)
    assert e.phases["loss"]["weights_dense"] == weights
    assert e.phases["loss"]["optimizer_states"] == states
    assert e.phase_model_peak == "loss"
    assert e.phase_peak_bytes == weights + adapters + states + ckpt + loss + overheads().cublas_workspace
    rec = _record("llama-3.1-8b/lora/r16/adamw_torch_fused/bs1x2048/gc").measured
    assert rec["optimizer_state_bytes"] == states
    assert rec["param_bytes_by_dtype_after_wrap"] == {"bfloat16": weights, "float32": adapters}


def test_llama1b_full(llama1b):
    s = Settings(method="full", optimizer="adamw_torch_fused", batch=4, seq=1024)
    e = estimate(llama1b, s)
    params = 1_235_814_400  # tied embeddings count once
    # tensors: embedding, 33 norms, 7 linears x 16 layers -> 146 fused-AdamW step tensors
    states = params * 2 * 2 + 146 * 4
    tokens, h, v = 4096, 2048, 128256
    ckpt = 16 * tokens * h * 2
    loss = tokens * v * 12 + tokens * h * (4 + 2)
    assert e.phases["optimizer step"]["gradients"] == params * 2  # bf16 gradients
    assert e.phase_model_peak == "loss"  # 6.3 GB of logits work beats the 2.5 GB of gradients
    assert e.phase_peak_bytes == params * 2 + states + ckpt + loss + overheads().cublas_workspace
    rec = _record("llama-3.2-1b/full/adamw_torch_fused/bs4x1024/gc").measured
    assert rec["optimizer_state_bytes"] == states


def test_optimizer_variants(llama8b):
    """Per-optimizer state sizes for the same LoRA adapters."""
    n = 41_943_040
    by = {
        o: estimate(llama8b, Settings(method="lora", optimizer=o))
        for o in ("adamw_torch", "adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor")
    }
    assert by["adamw_torch"].phases["loss"]["optimizer_states"] == 8 * n  # step on the CPU
    assert by["adamw_8bit"].phases["loss"]["optimizer_states"] == 2 * n + 2 * 4 * (n // 256)
    assert by["paged_adamw_32bit"].paged_bytes == 8 * 32 * 3 * 16 * I
    assert not by["sgd"].phases["loss"].get("optimizer_states")
    # Adafactor: factored (rows + cols) second moment per 2-D adapter tensor
    rows_cols = sum(16 + d for d in (H, H, H, KV, H, KV, H, H, H, I, H, I, I, H)) * L * 4
    assert by["adafactor"].phases["loss"]["optimizer_states"] == rows_cols


def test_no_gradient_checkpointing_keeps_every_layer(llama8b):
    on = estimate(llama8b, Settings())
    off = estimate(llama8b, Settings(gradient_checkpointing=False))
    assert off.peak_allocated_bytes > on.peak_allocated_bytes
    # QLoRA layer, per token: norms 2x(4h + 4 B rsqrt), attention bf16 q,k,v + out + lse, mlp 3 fp32 intermediates,
    # LoRA: mask + bf16 copy of each adapted input (+ bf16 lora_B input)
    per_token = 2 * (4 * H + 4) + (2 * (H + 2 * KV) + 2 * H + 4 * 32) + 3 * I * 4
    per_token += 3 * (3 * H + 32) + (3 * H + 32) + 2 * (3 * H + 32) + (3 * I + 32)
    assert off.phases["loss"]["activations"] == L * 2048 * per_token


@pytest.mark.parametrize(
    "targets,expect", [("attn", {"q_proj", "k_proj", "v_proj", "o_proj"}), ("q_proj,v_proj", {"q_proj", "v_proj"})]
)
def test_targets(llama8b, targets, expect):
    from qlora_bench.estimate.adapters import target_modules

    assert {m.name for m in target_modules(llama8b, Settings(targets=targets))} == expect


def test_kv_cache_and_serving_modes(llama8b):
    from qlora_bench.estimate.inference import InferSettings, adapter_file_bytes, estimate_inference, kv_cache_bytes

    # K and V x 32 layers x 8 kv heads x 128 dims x 2 bytes = 131,072 B per token
    assert kv_cache_bytes(llama8b, 1, 1) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_cache_bytes(llama8b, 4, 4096) == 2 * 1024**3
    from qlora_bench.profiles import resolve_model

    assert kv_cache_bytes(resolve_model("70b"), 1, 1) == 2 * 80 * 8 * 128 * 2  # GQA: 8 of 64 heads
    assert kv_cache_bytes(resolve_model("llama-2-70b"), 1, 1) == kv_cache_bytes(resolve_model("70b"), 1, 1)
    assert kv_cache_bytes(resolve_model("65b"), 1, 1) == 2 * 80 * 64 * 128 * 2  # no GQA: 8x more
    s, inf = Settings(), InferSettings(batch=1, context=4096, prompt=2048, adapters=3)
    m = {mode: estimate_inference(llama8b, s, inf, mode) for mode in ("base16", "adapters4", "merged16", "merged4")}
    assert m["merged16"].components == m["base16"].components  # a merged model needs full 16-bit memory
    assert m["base16"].components["weights_16bit"] == 8_030_261_248 * 2
    assert m["adapters4"].components["adapters"] == 3 * 41_943_040 * 4  # fp32, three adapters
    assert m["merged4"].peak_device_bytes < m["adapters4"].peak_device_bytes < m["base16"].peak_device_bytes
    assert m["adapters4"].components["weights_4bit"] == 3_489_660_928
    assert adapter_file_bytes(llama8b, s) > 41_943_040 * 4  # the fp32 tensors plus the safetensors header


def test_merge_peak(llama8b):
    from qlora_bench.estimate.inference import merge_peak

    m = merge_peak(llama8b, Settings(), 80 * 1024**3)
    # 16-bit base + fp32 adapter + delta of the largest module (4096 x 14336) in fp32, then bf16
    assert m.peak_bytes == 8_030_261_248 * 2 + 41_943_040 * 4 + 4096 * 14336 * 6 and m.fits_gpu
    assert not merge_peak(llama8b, Settings(), 12 * 1024**3).fits_gpu  # -> the CPU path
