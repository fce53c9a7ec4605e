"""Throughput: FLOPs per token, model / hardware FLOPs utilization, and predicted step time and tokens/s.

FLOPs per token (matmuls; N = weights a token multiplies: decoder linears, the k active experts of a MoE, and
the lm_head; A = causal attention, 2 * seq * heads * head_dim per layer forward):
- forward: 2N + A;
- backward: input gradients 2N + 2A, plus weight gradients 2 * (trainable matmul weights) — all of N for full
  fine-tuning (6N + 3A in total, Kaplan et al. 2020 / Chinchilla's 6N), only the adapters for LoRA / QLoRA
  (about 4N + 3A);
- gradient checkpointing recomputes the decoder layers' forward once more (hardware FLOPs, not useful ones).
MFU counts useful FLOPs, HFU adds the recomputation (PaLM, Chowdhery et al. 2022, appendix B).

Step time: estimate/steptime.py prices the step's kernels one by one. MFU and HFU divide the FLOPs above per token x
tokens/s by the GPU's dense bf16 peak (its datasheet figure, without sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..profiles import GpuSpec, ModelSpec
from ..settings import Settings
from .adapters import adapter_params
from .weights import quantized_modules

DEQUANT_BYTES_PER_PARAM = 0.5 + 2 + 2  # read packed 4-bit, write bf16, read bf16 again in the GEMM


@dataclass(frozen=True)
class Flops:
    useful_per_token: float  # model FLOPs (MFU numerator)
    hardware_per_token: float  # + recomputation (HFU numerator)
    dequant_bytes_per_step: float  # QLoRA dequantization traffic per optimizer step


def matmul_params_per_token(model: ModelSpec) -> int:
    """Weights one token multiplies: all decoder linears (k of E experts in a MoE) and the lm_head."""
    per_layer = 0
    for m in model.layer_modules():
        if m.group == "expert":
            per_layer += m.in_features * m.out_features * model.experts_per_token
        else:
            per_layer += m.in_features * m.out_features * m.count
    return per_layer * model.num_layers + model.vocab_size * model.hidden_size


def attention_flops_per_token(model: ModelSpec, seq: int) -> float:
    """Causal attention forward per token: QK^T and PV, 2 * 2 * seq * q each, halved by the causal mask."""
    return 2 * seq * model.num_heads * model.head_dim * model.num_layers


def flops(model: ModelSpec, s: Settings) -> Flops:
    n = matmul_params_per_token(model)
    a = attention_flops_per_token(model, s.seq)
    lm_head = model.vocab_size * model.hidden_size
    fwd = 2 * n + a
    bwd_inputs = 2 * n + 2 * a
    if s.uses_adapters:
        n_ad = adapter_params(model, s)
        adapters = 6 * n_ad  # forward, input and weight gradients of the small adapter matmuls
        useful = fwd + bwd_inputs + adapters
    else:
        useful = fwd + bwd_inputs + 2 * n
        adapters = 0
    recompute = (
        2 * (n - lm_head) + a + (2 * adapter_params(model, s) if s.uses_adapters else 0)
        if s.gradient_checkpointing
        else 0
    )
    dequant = 0.0
    if s.method == "qlora":
        q = sum(m.in_features * m.out_features * m.count for m in quantized_modules(model)) * model.num_layers
        passes = 3 if s.gradient_checkpointing else 2  # forward, (recompute), backward
        dequant = q * DEQUANT_BYTES_PER_PARAM * passes * s.grad_accum
    return Flops(useful_per_token=useful, hardware_per_token=useful + recompute, dequant_bytes_per_step=dequant)


def mfu(model: ModelSpec, s: Settings, gpu: GpuSpec, tokens_per_sec: float) -> tuple[float, float] | None:
    """(MFU, HFU) of a measured throughput; None when the GPU's peak is unknown."""
    if not gpu.dense_tflops:
        return None
    f = flops(model, s)
    peak = gpu.dense_tflops * 1e12
    return f.useful_per_token * tokens_per_sec / peak, f.hardware_per_token * tokens_per_sec / peak
