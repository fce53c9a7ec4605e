"""The analytic VRAM estimator (pure Python; imports no torch).

`estimate(model, settings)` returns named components in bytes and three peaks:
- allocated: what `torch.cuda.max_memory_allocated()` reports;
- reserved: what `torch.cuda.max_memory_reserved()` reports (the caching allocator's segments);
- device: what NVML / nvidia-smi shows for the process (reserved + CUDA context + libraries + paged states).
Two views of one step, checked against each other: the phase model (each phase lists the tensors alive at its
worst moment, by name: the breakdown `plan` prints) and the step's allocation program (program.py: every tensor
in program order) replayed through the model of PyTorch's caching allocator (allocator.py), which gives the
allocated and reserved peaks. Only what no mechanism gives is fitted (overhead.py: CUDA context, libraries).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from ..profiles import ModelSpec
from ..settings import Settings
from . import activations as act
from .adapters import ADAPTER_DTYPE, adapter_params, adapter_tensors, target_modules
from .allocator import AllocatorConfig, Replay, replay
from .dtypes import nbytes
from .optimizer import OptimizerBytes, Trainable, gradient_bytes, optimizer_bytes
from .overhead import Overheads, overheads
from .program import program as step_program
from .weights import WeightBytes, weight_bytes

LABELS = {
    "weights_4bit": "base weights, 4-bit packed",
    "quant_constants": "quantization constants",
    "weights_dense": "base weights, not quantized",
    "upcast_transient": "16-bit copy during fp32 upcast",
    "lora_adapters": "LoRA adapters (fp32)",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "optimizer_step_temp": "optimizer step temporaries",
    "activations": "activations kept for backward",
    "recompute_layer": "recomputed layer (checkpointing)",
    "grads_in_flight": "activation gradients in flight",
    "loss_head": "logits + cross-entropy",
    "lm_head_cast": "lm_head bf16 copy (autocast)",
    "adapter_casts": "adapter bf16 copies (autocast)",
    "dequant_transient": "dequantized weight (transient)",
    "cublas_workspace": "cuBLAS workspace",
    "temporaries": "other temporaries",
    # trace's categories (plan --trace)
    "parameters": "parameters and buffers",
    "quant_state": "quantization constants",
    "workspaces": "cuBLAS / attention workspaces",
    "inputs": "token ids",
    "load_transient": "loading transients",
    "allocator_reserve": "allocator cache / fragmentation (simulated)",
    "cuda_context": "CUDA context + libraries",
    "paged_optimizer": "paged optimizer states (managed)",
}

# Live tensors of a kind smaller than this at the peak are shown as "other temporaries" (a line that would print
# 0.00 GiB says nothing)
SMALL_COMPONENT_BYTES = 8 * 2**20

# Components allocated once (at load or at the first optimizer step) and kept for the whole run.
PERSISTENT = (
    "weights_4bit",
    "quant_constants",
    "weights_dense",
    "lora_adapters",
    "optimizer_states",
    "cublas_workspace",
)


@dataclass
class Estimate:
    model: ModelSpec
    settings: Settings
    phases: dict[str, dict[str, int]]  # phase -> component -> bytes (torch-allocated tensors)
    peak_phase: str
    components: dict[str, int]  # the peak phase's tensors + allocator reserve + context + paged
    peak_allocated_bytes: int
    dynamic_bytes: int  # the part of the allocated peak that is created and freed within a step
    peak_reserved_bytes: int
    peak_device_bytes: int
    device_low_bytes: int
    device_high_bytes: int
    paged_bytes: int
    total_params: int
    trainable_params: int
    overheads: Overheads
    notes: list[str] = field(default_factory=list)
    replay: Replay | None = None  # the allocator simulation (None: reserved scaled from a replayed anchor)
    fragmentation_bytes: int = 0  # reserved peak - allocated peak: cached blocks that the peak's requests did not fit

    @property
    def phase_model_peak(self) -> str:
        """The phase model's worst phase (the cross-check of the simulation)."""
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def phase_peak_bytes(self) -> int:
        """The phase model's allocated peak: the named tensors of its worst phase."""
        return sum(self.phases[self.phase_model_peak].values())

    @property
    def resident_device_bytes(self) -> int:
        """Device memory that cannot move to the host: paged (managed) optimizer states can."""
        return self.peak_device_bytes - self.paged_bytes

    def to_dict(self) -> dict:
        return {
            "model": self.model.name,
            "method": self.settings.method,
            "settings": self.settings.to_dict(),
            "components": dict(self.components),
            "peak_phase": self.peak_phase,
            "phases": {k: sum(v.values()) for k, v in self.phases.items()},
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "peak_device_band_bytes": [self.device_low_bytes, self.device_high_bytes],
            "paged_bytes": self.paged_bytes,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "fragmentation_bytes": self.fragmentation_bytes,
            "reserved_from": "allocator replay" if self.replay else "scaled from a replayed configuration",
            "calibration": self.overheads.source,
            "notes": list(self.notes),
        }


def trainable_tensors(model: ModelSpec, s: Settings) -> list[Trainable]:
    if s.uses_adapters:
        b = nbytes(ADAPTER_DTYPE)
        return [Trainable(t.numel, t.count, b, (s.rank, t.numel // s.rank)) for t in adapter_tensors(model, s)]
    b = nbytes(s.compute_dtype)
    h, v, L = model.hidden_size, model.vocab_size, model.num_layers
    out = [Trainable(v * h, 1, b, (v, h))]
    if not model.tie_word_embeddings:
        out.append(Trainable(v * h, 1, b, (v, h)))
    out.append(Trainable(h, L * model.norms_per_layer + 1, b))
    for m in model.layer_modules():
        out.append(Trainable(m.in_features * m.out_features * m.count, L, b, (m.out_features, m.in_features), m.count))
        if m.bias:
            out.append(Trainable(m.out_features, L * m.count, b))
    return out


def _notes(model: ModelSpec, s: Settings, w: WeightBytes) -> list[str]:
    notes = [model.planned_as] if model.planned_as else []
    if s.method == "qlora" and model.is_moe:
        notes.append(
            "transformers 5.x stores MoE experts as fused parameters that bitsandbytes does not quantize: they "
            "stay "
            + ("16-bit and prepare_model_for_kbit_training casts them to fp32" if s.upcast_non_quantized else "16-bit")
            + f" ({sum(m.weight_params for m in model.layer_modules() if not m.is_linear) * model.num_layers / 1e9:.1f}"
            " B parameters)"
        )
    if (
        model.is_moe
        and s.uses_adapters
        and s.dropout > 0
        and any(m.group == "expert" for m in target_modules(model, s))
    ):
        notes.append(
            "peft 0.21 refuses LoRA dropout on fused MoE experts (lora.ParamWrapper): train with --dropout 0, or "
            "--targets attn to leave the experts alone"
        )
    if model.is_moe and s.compute_dtype == "fp32":
        notes.append(
            "transformers 5.23 runs MoE experts with grouped_mm on sm80+ GPUs, which refuses fp32 experts "
            "('Expected inputs of BF16 type', seen in `trace`): use --compute-dtype bf16"
        )
    elif model.is_moe and s.method == "qlora" and s.upcast_non_quantized:
        notes.append(
            "transformers 5.23 runs MoE experts with grouped_mm on sm80+ GPUs, which refuses the fp32 experts "
            "prepare_model_for_kbit_training leaves ('Expected inputs of BF16 type'): use --no-upcast-non-quantized "
            "(seen in `trace`)"
        )
    if s.alloc_conf and AllocatorConfig.parse(s.alloc_conf).per_process_memory_fraction != 1.0:
        notes.append(
            "per_process_memory_fraction (and garbage_collection_threshold with it) is not simulated: it needs the "
            "GPU's capacity; the reserved peak is the unconstrained one"
        )
    if model.model_type == "gemma2" and s.attn == "sdpa":
        notes.append(
            "Gemma-2: transformers 5.23 refuses attn_implementation='sdpa' (it cannot apply the attention logit "
            "softcapping): train with --attn eager or flash_attention_2; planned here as sdpa's flash kernel"
        )
    return notes


def estimate(
    model: ModelSpec, settings: Settings, ov: Overheads | None = None, anchor: Estimate | None = None
) -> Estimate:
    """The estimate of one configuration. `anchor`: a replayed estimate of a neighbouring configuration whose
    simulated slack is reused instead of replaying this one (plan's searches, which verify their answer)."""
    s = settings.validated()
    ov = ov or overheads()
    w = weight_bytes(model, s)
    n_adapter = adapter_params(model, s)
    adapters = n_adapter * nbytes(ADAPTER_DTYPE)
    tensors = trainable_tensors(model, s)
    grads = gradient_bytes(tensors)
    opt: OptimizerBytes = optimizer_bytes(tensors, s.optimizer_kind)
    tokens = s.tokens_per_step

    static = {
        "weights_4bit": w.quantized_packed,
        "quant_constants": w.quant_constants,
        "weights_dense": w.dense,
        "lora_adapters": adapters,
    }
    steady = {**static, "optimizer_states": opt.device, "cublas_workspace": ov.cublas_workspace}

    per_token = sum(act.layer_saved_per_token(model, s).values())
    one_layer = per_token * tokens + act.layer_saved_fixed(model, s)
    all_layers = one_layer * model.num_layers
    in_flight = act.layer_grad_in_flight_per_token(model, s) * tokens + act.merged_expert_bytes(model, s, True)
    dequant = act.dequant_transient_bytes(model, s, w.largest_quantized_numel)
    ckpt = act.checkpoint_bytes(model, s)
    gc = s.gradient_checkpointing
    casts = act.adapter_cast_bytes(n_adapter, s)

    # gradients that exist when backward reaches the first / the last decoder layer
    if s.method == "full":
        b = nbytes(s.compute_dtype)
        head_grads = model.vocab_size * model.hidden_size * b
        grads_before_embed = grads - (0 if model.tie_word_embeddings else head_grads)
    else:
        head_grads, grads_before_embed = 0, grads

    phases = {
        "load": {**static, "lora_adapters": 0, "upcast_transient": w.upcast_transient},
        "loss": {
            **steady,
            "activations": ckpt if gc else all_layers,
            "loss_head": act.loss_head_bytes(model, s),
            "lm_head_cast": act.lm_head_cast_bytes(model, s, w.dense_dtype),
            "adapter_casts": casts,
        },
        "backward (last layer)": {
            **steady,
            "activations": ckpt if gc else all_layers,
            "recompute_layer": one_layer if gc else 0,
            "grads_in_flight": in_flight,
            "gradients": head_grads,
            "dequant_transient": dequant,
            "adapter_casts": casts,
        },
        "backward (first layer)": {
            **steady,
            "activations": (ckpt // model.num_layers) if gc else one_layer,
            "recompute_layer": one_layer if gc else 0,
            "grads_in_flight": in_flight,
            "gradients": grads_before_embed,
            "dequant_transient": dequant,
        },
        "optimizer step": {**steady, "gradients": grads, "optimizer_step_temp": opt.step_transient},
    }
    if s.method == "full" and model.tie_word_embeddings:
        # a tied weight has one AccumulateGrad node: the lm_head's gradient waits in its input buffer through the
        # whole backward, and at the end the embedding's gradient and their out-of-place sum join it
        phases["backward (embedding)"] = {**steady, "gradients": grads, "grads_in_flight": 2 * head_grads}

    def alloc_of(p: str) -> int:
        return sum(phases[p].values())

    def dynamic_of(p: str) -> int:
        return alloc_of(p) - sum(phases[p].get(k, 0) for k in PERSISTENT)

    # the breakdown: the phase whose named tensors peak
    peak_phase = max(phases, key=alloc_of)
    dynamic = dynamic_of(peak_phase)
    if anchor is None:
        rep = replayed(model, s, ov.cublas_workspace)
        allocated, reserved = rep.peak_allocated, rep.peak_reserved
        frag = reserved - allocated
    else:  # a search step: the anchor's simulated slack per byte of step memory (plan replays what it reports)
        rep = None
        allocated = round(alloc_of(peak_phase) * anchor.peak_allocated_bytes / max(anchor.phase_peak_bytes, 1))
        slack = (anchor.peak_reserved_bytes - anchor.peak_allocated_bytes) * dynamic / max(anchor.dynamic_bytes, 1)
        reserved = allocated + round(slack)
        frag = reserved - allocated
    uses_bnb = s.method == "qlora" or s.optimizer_kind in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
    context = ov.cuda_context + (ov.bnb_runtime if uses_bnb else 0)
    device = reserved + context + opt.paged
    # the band: the mechanism's worst relative errors on the committed records, each way
    low = round(reserved * (1 - ov.reserved_error_over)) + context - ov.context_spread_low + opt.paged
    high = round(reserved * (1 + ov.reserved_error_under)) + context + ov.context_spread_high + opt.paged

    if rep is not None:  # the simulated step's live tensors at its allocated peak, by what they are
        peak_phase = rep.peak_allocated_phase or peak_phase
        live = dict(rep.live_by_tag_at_peak)
        small = [k for k, v in live.items() if v < SMALL_COMPONENT_BYTES and k != "temporaries"]
        live["temporaries"] = live.get("temporaries", 0) + sum(live.pop(k) for k in small)
        components = {k: live[k] for k in LABELS if live.get(k)}
        components.update({k: v for k, v in live.items() if k not in components and v})
    else:  # a search step: the phase model's tensors, scaled to the anchor's simulation
        components = {k: v for k, v in phases[peak_phase].items() if v}
    components["allocator_reserve"] = reserved - sum(components.values())
    components["cuda_context"] = context
    if opt.paged:
        components["paged_optimizer"] = opt.paged
    trainable = n_adapter if s.uses_adapters else model.total_params
    return Estimate(
        model=model,
        settings=s,
        phases=phases,
        peak_phase=peak_phase,
        components=components,
        peak_allocated_bytes=allocated,
        dynamic_bytes=dynamic,
        peak_reserved_bytes=reserved,
        peak_device_bytes=device,
        device_low_bytes=min(low, device),
        device_high_bytes=max(high, device),
        paged_bytes=opt.paged,
        total_params=model.total_params + n_adapter,
        trainable_params=trainable,
        overheads=ov,
        notes=_notes(model, s, w),
        replay=rep,
        fragmentation_bytes=frag,
    )


def replayed(model: ModelSpec, s: Settings, workspace: int) -> Replay:
    """One step's allocation program through the caching-allocator model (memoized: plan asks again). The
    memo's key adds the config fields the program reads beyond ModelSpec's (whose `config` does not compare)."""
    window = (model.config.get("sliding_window"), model.config.get("use_sliding_window"))
    return _replayed(model, s, workspace, window)


@lru_cache(maxsize=256)
def _replayed(model: ModelSpec, s: Settings, workspace: int, window: tuple) -> Replay:
    return replay(step_program(model, s, workspace=workspace), allocator_config(s))


def allocator_config(s: Settings) -> AllocatorConfig:
    """The settings' allocator config as the simulation can run it: a per-process memory fraction (and the
    garbage-collection threshold, which torch applies only under one) needs the GPU's capacity, which an estimate
    does not have, so they are left out (estimate() says so)."""
    conf = AllocatorConfig.parse(s.alloc_conf)
    if conf.per_process_memory_fraction != 1.0:
        conf = replace(conf, per_process_memory_fraction=1.0, garbage_collection_threshold=None)
    return conf
