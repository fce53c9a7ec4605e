"""Model and GPU profiles: load, validate, resolve names.

Model profiles hold the fields of the model's own `config.json` (so a profile and a user's local config.json go
through the same parser). GPU profiles hold memory as the driver reports it plus peak throughput figures.
The data files live in the repository's top-level `profiles/` folder; a wheel ships them as
`qlora_bench/_profiles` (see pyproject.toml).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .errors import InputError, closest, read_json
from .units import GiB, MiB

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3")

# transformers' per-architecture default for tie_word_embeddings when config.json omits it
# (LlamaConfig/MistralConfig/MixtralConfig/Qwen2Config/Phi3Config: False; Gemma2Config: True).
_TIE_DEFAULT = {"llama": False, "mistral": False, "mixtral": False, "qwen2": False, "gemma2": True, "phi3": False}


def profiles_dir() -> Path:
    """`profiles/` next to the package (source tree / editable install) or inside it (wheel install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_profiles", here.parent / "profiles"):
        if (candidate / "models").is_dir():
            return candidate
    raise InputError(f"profile data not found (looked in {here / '_profiles'} and {here.parent / 'profiles'})")


@dataclass(frozen=True)
class LinearModule:
    """One kind of weight matrix in a decoder layer, as the model stores it.

    `count` is how many of them a layer has (experts); `is_linear` says whether it is an `nn.Linear`
    (bitsandbytes only converts nn.Linear to Linear4bit, and peft's all-linear only targets nn.Linear).
    """

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    count: int = 1
    is_linear: bool = True
    group: str = "attn"  # attn | mlp | expert | router

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def bias_params(self) -> int:
        return self.out_features * self.count if self.bias else 0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    source: str = ""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    num_experts: int = 1
    experts_per_token: int = 1
    final_logit_softcapping: float | None = None
    hf_id: str | None = None
    note: str | None = None
    config: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- structure -------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def norms_per_layer(self) -> int:
        # Gemma-2 has pre/post attention and pre/post feed-forward RMSNorms; the others two.
        return 4 if self.model_type == "gemma2" else 2

    def layer_modules(self) -> list[LinearModule]:
        """The weight matrices of one decoder layer, named as transformers names them."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
        if self.model_type == "phi3":
            attn = [
                LinearModule("qkv_proj", h, q_out + 2 * kv_out),
                LinearModule("o_proj", q_out, h),
            ]
        else:
            attn = [
                LinearModule("q_proj", h, q_out, self.qkv_bias),
                LinearModule("k_proj", h, kv_out, self.qkv_bias),
                LinearModule("v_proj", h, kv_out, self.qkv_bias),
                LinearModule("o_proj", q_out, h, self.o_bias),
            ]
        if self.is_moe:
            # transformers 5.x MixtralExperts: fused 3-D nn.Parameters gate_up_proj [E, 2i, h] and
            # down_proj [E, h, i]; the router is a plain [E, h] Parameter. None of them is an nn.Linear.
            e = self.num_experts
            mlp = [
                LinearModule("experts.gate_up_proj", h, 2 * i, count=e, is_linear=False, group="expert"),
                LinearModule("experts.down_proj", i, h, count=e, is_linear=False, group="expert"),
                LinearModule("router", h, e, is_linear=False, group="router"),
            ]
        elif self.model_type == "phi3":
            mlp = [LinearModule("gate_up_proj", h, 2 * i, group="mlp"), LinearModule("down_proj", i, h, group="mlp")]
        else:
            b = self.mlp_bias
            mlp = [
                LinearModule("gate_proj", h, i, b, group="mlp"),
                LinearModule("up_proj", h, i, b, group="mlp"),
                LinearModule("down_proj", i, h, b, group="mlp"),
            ]
        return attn + mlp

    # ---- parameter counts (must equal transformers' meta-device model) --------------------------
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """0 when tied: the tied lm_head shares the embedding's Parameter and counts once."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (self.num_layers * self.norms_per_layer + 1) * self.hidden_size

    @property
    def layer_weight_params(self) -> int:
        return sum(m.weight_params for m in self.layer_modules())

    @property
    def layer_bias_params(self) -> int:
        return sum(m.bias_params for m in self.layer_modules())

    @property
    def total_params(self) -> int:
        per_layer = self.layer_weight_params + self.layer_bias_params
        return self.embedding_params + self.lm_head_params + self.norm_params + self.num_layers * per_layer


def _need(cfg: dict, key: str, where: str) -> int:
    if key not in cfg or cfg[key] is None:
        raise InputError(f"{where}: missing field '{key}'")
    v = cfg[key]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise InputError(f"{where}: field '{key}' must be a positive integer, got {v!r}")
    return v


def model_from_config(cfg: dict, name: str, where: str, **meta) -> ModelSpec:
    """Build a ModelSpec from config.json fields, with transformers' defaults for omitted ones."""
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: expected a JSON object of config.json fields")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"{where}: field 'model_type' is {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    h = _need(cfg, "hidden_size", where)
    heads = _need(cfg, "num_attention_heads", where)
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise InputError(f"{where}: field 'num_key_value_heads' must divide num_attention_heads ({heads}), got {kv!r}")
    experts = cfg.get("num_local_experts", 1) if mt == "mixtral" else 1
    spec = ModelSpec(
        name=name,
        model_type=mt,
        hidden_size=h,
        intermediate_size=_need(cfg, "intermediate_size", where),
        num_layers=_need(cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=_need(cfg, "vocab_size", where),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", _TIE_DEFAULT[mt])),
        # Qwen2Attention always has q/k/v biases; Llama/Mistral follow `attention_bias` (o_proj too).
        qkv_bias=True if mt == "qwen2" else bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)) if mt in ("llama",) else False,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
        num_experts=experts,
        experts_per_token=cfg.get("num_experts_per_tok", 2) if experts > 1 else 1,
        final_logit_softcapping=cfg.get("final_logit_softcapping") if mt == "gemma2" else None,
        config=cfg,
        **meta,
    )
    return spec


# ---- model resolution ------------------------------------------------------------------------------
@cache
def _model_profiles() -> dict[str, dict]:
    out = {}
    for path in sorted((profiles_dir() / "models").glob("*.json")):
        data = read_json(path)
        for key in ("name", "config", "source"):
            if key not in data:
                raise InputError(f"{path}: missing field '{key}'")
        out[data["name"]] = data
    return out


@cache
def _model_index() -> dict[str, str]:
    """lower-cased name / alias / hub id -> profile name."""
    idx = {}
    for name, data in _model_profiles().items():
        for key in [name, *data.get("aliases", []), data.get("hf_id") or ""]:
            if key:
                idx[key.lower()] = name
    return idx


def model_names() -> list[str]:
    return list(_model_profiles())


def load_model_profile(name: str) -> ModelSpec:
    data = _model_profiles()[name]
    path = profiles_dir() / "models" / f"{name}.json"
    return model_from_config(
        data["config"], name, str(path), source=data["source"], hf_id=data.get("hf_id"), note=data.get("note")
    )


def _read_config_file(path: Path) -> ModelSpec:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: no such config file")
    cfg = read_json(path)
    name = path.parent.name if path.name == "config.json" else path.stem
    return model_from_config(cfg, name or str(path), str(path), source=f"local file {path}")


def _fetch_hub_config(repo_id: str) -> ModelSpec:
    url = f"https://huggingface.co/{repo_id}/resolve/main/config.json"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (fixed https host)
            cfg = json.loads(resp.read().decode())
    except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(
            f"cannot fetch config.json for hub id '{repo_id}' ({reason}); offline? download its config.json "
            "and pass the file path, or use a built-in profile (qlora-bench profiles)"
        ) from None
    return model_from_config(cfg, repo_id, f"hub:{repo_id}", source=f"{url}", hf_id=repo_id)


def resolve_model(arg: str) -> ModelSpec:
    """A profile name or alias, a local config.json (file or folder), or a hub id (needs network)."""
    key = arg.strip().lower()
    if key in _model_index():
        return load_model_profile(_model_index()[key])
    path = Path(arg).expanduser()
    if path.exists() or arg.endswith(".json"):
        return _read_config_file(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", arg):
        return _fetch_hub_config(arg)
    hint = closest(key, list(_model_index()))
    raise InputError(
        f"unknown model '{arg}'"
        + (f"; closest profiles: {', '.join(hint)}" if hint else "")
        + " (see `qlora-bench profiles`; a config.json path or hub id also works)"
    )


# ---- GPUs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_total_bytes: int  # as NVML / nvidia-smi report it ("Total"), per GPU
    count: int = 1
    device_name: str = ""
    bf16_supported: bool = True
    dense_tflops: float | None = None  # bf16 (fp16 where bf16 is unsupported)
    memory_bandwidth_GBps: float | None = None
    generic: bool = False

    @property
    def label(self) -> str:
        return f"{self.count}x {self.name}" if self.count > 1 else self.name


@cache
def _gpu_profiles() -> dict[str, dict]:
    out = {}
    for path in sorted((profiles_dir() / "gpus").glob("*.json")):
        data = read_json(path)
        for key in ("name", "memory_total_MiB", "bf16_supported", "memory_source"):
            if key not in data:
                raise InputError(f"{path}: missing field '{key}'")
        if not isinstance(data["memory_total_MiB"], int) or data["memory_total_MiB"] <= 0:
            raise InputError(f"{path}: field 'memory_total_MiB' must be a positive integer")
        out[data["name"]] = data
    return out


@cache
def _gpu_index() -> dict[str, str]:
    idx = {}
    for name, data in _gpu_profiles().items():
        for key in [name, *data.get("aliases", [])]:
            idx[key.lower()] = name
    return idx


def gpu_names() -> list[str]:
    return list(_gpu_profiles())


def _gpu_from_profile(name: str, count: int) -> GpuSpec:
    d = _gpu_profiles()[name]
    return GpuSpec(
        name=name,
        memory_total_bytes=d["memory_total_MiB"] * MiB,
        count=count,
        device_name=d.get("device_name", ""),
        bf16_supported=d["bf16_supported"],
        dense_tflops=d.get("dense_bf16_TFLOPS", d.get("dense_fp16_TFLOPS")),
        memory_bandwidth_GBps=d.get("memory_bandwidth_GBps"),
    )


def gpu_from_device_name(device_name: str | None) -> GpuSpec | None:
    """The profile whose `device_name` is what torch / NVML report for this board (e.g. records' gpu_name)."""
    if not device_name:
        return None
    for name, d in _gpu_profiles().items():
        if d.get("device_name", "").lower() == device_name.lower():
            return _gpu_from_profile(name, 1)
    return None


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(gb|gib|g)$")


def resolve_gpu(arg: str) -> GpuSpec:
    """'h100', 'rtx-4090', '48gb', '24GiB', '80 GB', '2x24gb', '2xh100'.

    A bare size is read as the marketed size, which for GPU memory is binary: a "48 GB" board reports
    ~48 GiB (RTX A6000: 49,140 MiB), so '48gb' and '48GiB' both mean 48 GiB.
    """
    key = arg.strip().lower().replace("_", "-")
    count = 1
    m = re.match(r"^(\d+)\s*[x*]\s*(.+)$", key)
    if m:
        count, key = int(m.group(1)), m.group(2).strip()
        if count < 1 or count > 64:
            raise InputError(f"GPU count in '{arg}' must be between 1 and 64")
    if key in _gpu_index():
        return _gpu_from_profile(_gpu_index()[key], count)
    m = _SIZE.match(key.replace(" ", ""))
    if m:
        size = float(m.group(1))
        if not 1 <= size <= 1024:
            raise InputError(f"GPU memory '{arg}' is out of range: give 1-1024 GB per GPU (e.g. 24gb, 2x24gb)")
        return GpuSpec(name=f"{size:g}GiB", memory_total_bytes=int(size * GiB), count=count, generic=True)
    if re.match(r"^\d+(\.\d+)?\s*(tb|mb|m|t|kb)$", key.replace(" ", "")):
        raise InputError(f"GPU memory '{arg}': use GB or GiB per GPU (e.g. 48gb, 24GiB, 2x24gb)")
    hint = closest(key, list(_gpu_index()))
    raise InputError(
        f"unknown GPU '{arg}'"
        + (f"; closest profiles: {', '.join(hint)}" if hint else "")
        + "; or give a size such as 24gb, 48GiB, 2x24gb"
    )


def slug_for(gpu_name: str | None) -> str:
    """Folder / file name for a GPU model: 'h100' for 'NVIDIA H100 80GB HBM3', 'geforce-rtx-4090', or 'cpu'."""
    if not gpu_name:
        return "cpu"
    words = gpu_name.lower().replace("nvidia", "").split()
    return words[0] if words and words[0] in ("h100", "h200", "b200", "gh200") else "-".join(words)


def gpu_slug() -> str:
    """slug_for() the GPU in this machine (NVML), or 'cpu'."""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return slug_for(name.decode() if isinstance(name, bytes) else name)
    except Exception:
        return "cpu"
