"""LoRA adapters as peft creates them.

Per adapted module (in -> out): lora_A [r, in] and lora_B [out, r] -> r * (in + out) parameters.
peft's `autocast_adapter_dtype=True` (the default) creates them in fp32 even on a 16-bit base.
Which modules are adapted: `all-linear` is peft's INCLUDE_LINEAR_LAYERS_SHORTHAND, every nn.Linear except the
output layer. For transformers 5.x MoE models peft (0.21) also adapts the router and the fused 3-D expert
parameters (`target_parameters`, one ParamWrapper per tensor): lora_A [r*E, in], lora_B [out, r*E], and it sets
rank_pattern/alpha_pattern to 2r for `gate_up_proj`, which fuses two projections (checked against
get_peft_model in tests/test_param_counts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..profiles import LinearModule, ModelSpec
from ..settings import Settings

ADAPTER_DTYPE = "fp32"  # peft LoraModel(autocast_adapter_dtype=True)


@dataclass(frozen=True)
class AdapterTensor:
    """One trainable LoRA tensor (needed per tensor: bitsandbytes optimizers decide 8-bit/paged by numel)."""

    numel: int
    count: int  # how many such tensors in the whole model


def target_modules(model: ModelSpec, s: Settings) -> list[LinearModule]:
    linear = [m for m in model.layer_modules() if m.is_linear]
    t = s.targets  # canonical: presets lower-cased, module names as written (peft matches them case-sensitively)
    if t == "all-linear":
        return model.layer_modules()  # peft adapts MoE routers and experts too
    if t == "attn":
        return [m for m in linear if m.group == "attn"]
    if t == "mlp":
        chosen = [m for m in model.layer_modules() if m.group in ("mlp", "expert", "router")]
        if not chosen:
            raise InputError(
                f"targets 'mlp': {model.name} has no nn.Linear MLP modules (MoE experts are fused parameters)"
            )
        return chosen
    names = [n.strip() for n in t.split(",") if n.strip()]
    by_name = {m.name: m for m in linear}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InputError(
            f"target module(s) {', '.join(unknown)} not in {model.name}; its linear modules: {', '.join(by_name)}"
            " (or all-linear, attn, mlp)"
        )
    return [by_name[n] for n in names]


def adapter_tensors(model: ModelSpec, s: Settings) -> list[AdapterTensor]:
    if not s.uses_adapters:
        return []
    out = []
    for m in target_modules(model, s):
        if m.group == "expert":
            # one ParamWrapper per fused tensor of E experts; gate_up_proj gets rank 2r (peft rank_pattern)
            r = s.rank * (2 if m.name.endswith("gate_up_proj") else 1) * m.count
            out += [
                AdapterTensor(r * m.in_features, model.num_layers),
                AdapterTensor(r * m.out_features, model.num_layers),
            ]
            continue
        if m.is_linear and s.rank > min(m.in_features, m.out_features):
            raise InputError(
                f"rank {s.rank} is larger than {m.name} ({m.in_features} -> {m.out_features}) of {model.name}; "
                f"use a rank <= {min(m.in_features, m.out_features)}"
            )
        n = m.count * model.num_layers
        out += [AdapterTensor(s.rank * m.in_features, n), AdapterTensor(s.rank * m.out_features, n)]
    return out


def adapter_params(model: ModelSpec, s: Settings) -> int:
    return sum(t.numel * t.count for t in adapter_tensors(model, s))
