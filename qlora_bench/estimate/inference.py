"""Inference memory after fine-tuning: four serving modes, the KV cache, generation's working set, adapters on
disk, and the memory of the merge itself. Pure Python like the rest of the estimator.

Serving modes (what people deploy after LoRA / QLoRA):
- base16: the 16-bit base model (no adapter);
- adapters4: the 4-bit base (bitsandbytes NF4 path: decoder linears quantized, embeddings / lm_head / norms in
  16-bit, no fp32 upcast at inference) with N unmerged adapters loaded (peft keeps them fp32 by default);
- merged16: the adapter merged into the 16-bit base (`merge_and_unload`): the base's size, no adapter;
- merged4: the merged model re-quantized to 4-bit: the 4-bit base's size, no adapter.

KV cache (transformers DynamicCache): keys and values per layer, GQA-sized:
2 x layers x kv_heads x head_dim x bytes x batch x context.
Generation's working set: the prefill of the prompt runs one layer at a time without autograd; its largest
transient is the MLP (gate, up and activation outputs: 3 x intermediate) plus q, k, v and the attention output,
for batch x prompt tokens, plus fp32 logits of the last position for sampling (generate keeps only the last
token's logits), plus for 4-bit the dequantized weight of the largest layer.
Reserved memory comes from replaying the serving process's allocations through the caching-allocator model
(`serving_program`: the weights tensor by tensor, the cache layer by layer, each layer's prefill transients).
The cache is allocated at its final length: DynamicCache's growth by concatenation during decoding (a new
block per layer per token) is not simulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..profiles import ModelSpec
from ..settings import Settings
from .adapters import adapter_params
from .allocator import replay
from .dtypes import nbytes
from .overhead import Overheads, overheads
from .weights import non_quantized_params, weight_bytes

MODES = ("base16", "adapters4", "merged16", "merged4")
MODE_LABELS = {
    "base16": "16-bit base",
    "adapters4": "4-bit base + unmerged adapters",
    "merged16": "merged, 16-bit",
    "merged4": "merged, re-quantized to 4-bit",
}
ADAPTER_BYTES = 4  # peft PeftModel.from_pretrained(autocast_adapter_dtype=True): adapters live in fp32
SAFETENSORS_HEADER_BYTES_PER_TENSOR = 200  # a JSON entry per tensor (name, dtype, shape, offsets); approximate


@dataclass(frozen=True)
class InferSettings:
    """What is served: the fine-tuning settings that shaped the adapter, plus the serving workload."""

    batch: int = 1
    context: int = 4096  # prompt + generated tokens held in the KV cache
    prompt: int = 2048  # tokens in one prefill
    adapters: int = 1  # adapters loaded at once (multi-tenant serving)
    kv_dtype: str = "bf16"


@dataclass
class InferEstimate:
    mode: str
    components: dict[str, int]
    peak_allocated_bytes: int
    peak_device_bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "label": MODE_LABELS[self.mode],
            "components": self.components,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "notes": self.notes,
        }


def kv_cache_bytes(model: ModelSpec, batch: int, context: int, dtype: str = "bf16") -> int:
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * nbytes(dtype) * batch * context


def adapter_bytes(model: ModelSpec, s: Settings) -> int:
    """One adapter in memory (fp32)."""
    return adapter_params(model, s) * ADAPTER_BYTES


def adapter_file_bytes(model: ModelSpec, s: Settings) -> int:
    """adapter_model.safetensors as peft saves it: the fp32 tensors plus a small JSON header."""
    n_tensors = 2 * sum(1 for _ in _adapted(model, s)) * model.num_layers
    return adapter_params(model, s) * ADAPTER_BYTES + n_tensors * SAFETENSORS_HEADER_BYTES_PER_TENSOR


def _adapted(model: ModelSpec, s: Settings):
    from .adapters import target_modules

    return target_modules(model, s)


def _weights(model: ModelSpec, s: Settings, four_bit: bool) -> dict[str, int]:
    if not four_bit:
        return {"weights_16bit": model.total_params * nbytes("bf16" if s.compute_dtype == "fp32" else s.compute_dtype)}
    w = weight_bytes(model, s.with_(method="qlora", upcast_non_quantized=False))
    return {
        "weights_4bit": w.quantized_packed,
        "quant_constants": w.quant_constants,
        "weights_16bit": non_quantized_params(model) * 2,
    }


def working_set_bytes(model: ModelSpec, s: Settings, inf: InferSettings, four_bit: bool) -> int:
    c = 2
    h, i = model.hidden_size, model.intermediate_size * model.experts_per_token
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    tokens = inf.batch * inf.prompt
    per_token = c * (3 * i + 2 * h + q + 2 * kv)
    logits = inf.batch * model.vocab_size * 4
    dequant = 0
    if four_bit:
        from .weights import quantized_modules

        dequant = max(m.in_features * m.out_features for m in quantized_modules(model)) * c
    return tokens * per_token + logits + dequant


def estimate_inference(
    model: ModelSpec, s: Settings, inf: InferSettings, mode: str, ov: Overheads | None = None
) -> InferEstimate:
    if mode not in MODES:
        raise ValueError(mode)
    ov = ov or overheads()
    four_bit = mode in ("adapters4", "merged4")
    comps = _weights(model, s, four_bit)
    if mode == "adapters4":
        comps["adapters"] = adapter_bytes(model, s) * inf.adapters
    comps["kv_cache"] = kv_cache_bytes(model, inf.batch, inf.context, inf.kv_dtype)
    comps["working_set"] = working_set_bytes(model, s, inf, four_bit)
    comps["cublas_workspace"] = ov.cublas_workspace
    allocated = sum(comps.values())
    rep = replay(serving_program(model, s, inf, four_bit, comps))
    comps["allocator_reserve"] = max(rep.peak_reserved - allocated, 0)
    comps["cuda_context"] = ov.cuda_context + (ov.bnb_runtime if four_bit else 0)
    notes = ["inference overheads reuse the training calibration: no inference run is measured yet"]
    if model.model_type == "gemma2":
        notes.append("Gemma-2's sliding-window layers could hold a shorter cache; DynamicCache keeps the full one")
    return InferEstimate(mode, comps, allocated, sum(comps.values()), notes)


def serving_program(model: ModelSpec, s: Settings, inf: InferSettings, four_bit: bool, comps: dict) -> list:
    """The serving process's allocations in order: weights per decoder layer (then the rest), adapters, the
    cuBLAS workspace, then per layer of the prefill its cache and its transients (q, k, v, attention output,
    gate / up / activation outputs), the logits, and the dequantized weight of the largest layer (4-bit)."""
    L = model.num_layers
    ev: list = []
    key = 0

    def alloc(n: int, tag: str) -> int:
        nonlocal key
        key += 1
        ev.append(("alloc", key, n, tag))
        return key

    for name, total in comps.items():  # static tensors: one per layer (per-layer share), then the remainder
        if name in ("kv_cache", "working_set", "cublas_workspace"):
            continue
        per = total // (L + 1)
        for _ in range(L):
            alloc(per, "parameters")
        alloc(total - per * L, "parameters")
    alloc(comps["cublas_workspace"], "workspaces")
    c = 2
    h, i = model.hidden_size, model.intermediate_size * model.experts_per_token
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    t = inf.batch * inf.prompt
    per_layer_cache = comps["kv_cache"] // (2 * L)
    x = alloc(t * h * c, "activations")
    for _ in range(L):
        alloc(per_layer_cache, "kv_cache")
        alloc(per_layer_cache, "kv_cache")
        tmp = [alloc(t * n * c, "temporaries") for n in (q, kv, kv, q)]
        if four_bit:
            tmp.append(alloc(max(m.in_features * m.out_features for m in model.layer_modules()) * c, "temporaries"))
        ev += [("free", k) for k in tmp]
        tmp = [alloc(t * n * c, "temporaries") for n in (i, i, i)]
        ev += [("free", k) for k in tmp]
        ev.append(("free", x))
        x = alloc(t * h * c, "activations")
    alloc(inf.batch * model.vocab_size * 4, "temporaries")
    return ev


@dataclass
class MergePlan:
    peak_bytes: int  # on the device doing the merge (GPU or host RAM)
    components: dict[str, int]
    fits_gpu: bool
    merged_file_bytes: int


def merge_peak(model: ModelSpec, s: Settings, usable_gpu_bytes: int) -> MergePlan:
    """The merge workflow: the base loaded in 16-bit, the adapter (fp32), and peft's merge of the largest
    module: delta = (B @ A) * scaling in the adapter dtype (fp32), cast to the weight dtype and added in place."""
    from .adapters import target_modules

    w16 = model.total_params * 2
    biggest = max((m.in_features * m.out_features for m in target_modules(model, s)), default=0)
    comps = {"weights_16bit": w16, "adapter": adapter_bytes(model, s), "merge_transient": biggest * (4 + 2)}
    peak = sum(comps.values())
    ov = overheads()
    return MergePlan(peak, comps, peak + ov.cuda_context + ov.cublas_workspace <= usable_gpu_bytes, w16)
