"""Model and GPU profiles: load, validate, resolve names.

Model profiles hold the fields of the model's own `config.json` (so a profile and a user's local config.json go
through the same parser). GPU profiles hold memory as the driver reports it plus peak throughput figures.
The data files live in the repository's top-level `profiles/` folder; a wheel ships them as
`qlora_bench/_profiles` (see pyproject.toml).
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from .errors import InputError, closest, file_kind, parse_json, read_json, read_json_object, shown, type_name
from .schema import load, rule
from .units import GiB, MiB


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
    attn_logit_softcapping: float | None = None
    max_position_embeddings: int | None = None
    defaulted: tuple = ()  # (field, value): size fields config.json left out, taken from transformers' defaults
    hf_id: str | None = None
    note: str | None = None
    # how a config outside the modelled families was read (generic Llama-like decoder, or a multimodal config's
    # language model): estimate() prints it with every plan
    planned_as: str | None = None
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


# ---- config.json ------------------------------------------------------------------------------------------
# transformers 5.23.0's defaults for the config fields the estimator reads, per model_type: the dataclass
# defaults of LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Gemma2Config and Phi3Config. A field a
# config.json leaves out takes these values, exactly as AutoConfig.from_dict would (a Mixtral config without
# num_local_experts is an 8-expert model, not a dense one). tests/test_profiles.py checks this table against the
# installed transformers. None means "derived": head_dim = hidden_size // num_attention_heads, num_key_value_heads
# = num_attention_heads (what the configs' __post_init__ and the attention modules do).
# fmt: off
CONFIG_DEFAULTS: dict[str, dict] = {
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, head_dim=None, max_position_embeddings=2048, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False,
    ),
    "mistral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=None, max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "mixtral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=None, max_position_embeddings=131072, tie_word_embeddings=False,
        num_local_experts=8, num_experts_per_tok=2,
    ),
    "qwen2": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=None, max_position_embeddings=32768, tie_word_embeddings=False,
    ),
    "gemma2": dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True,
        attention_bias=False, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
    ),
    "phi3": dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, head_dim=None, max_position_embeddings=4096, tie_word_embeddings=False,
    ),
}
# fmt: on
SUPPORTED_MODEL_TYPES = tuple(CONFIG_DEFAULTS)
# null in these means "derive it" (transformers: `int | None` fields); elsewhere null is refused, as the strict
# configs of transformers 5.x refuse it (`max_position_embeddings: null` is a TypeError there)
_NULL_MEANS_DERIVED = ("num_key_value_heads", "head_dim")
# fields that change memory: when a config.json leaves one out and transformers fills in a value of its own (not
# one derived from the others, like head_dim = hidden_size // heads), plan says so
MEMORY_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "num_local_experts",
    "num_experts_per_tok",
)


@dataclass(frozen=True)
class ConfigFields:
    """The config.json fields the estimator reads, typed as transformers' strict configs type them. The upper
    bounds are far beyond any released model (64x the largest dimension in use) and refuse only typos."""

    model_type: Literal[SUPPORTED_MODEL_TYPES]
    vocab_size: int = rule(ge=1, le=1 << 24)
    hidden_size: int = rule(ge=1, le=1 << 20)
    intermediate_size: int = rule(ge=1, le=1 << 22)
    num_hidden_layers: int = rule(ge=1, le=1 << 14)
    num_attention_heads: int = rule(ge=1, le=1 << 14)
    max_position_embeddings: int = rule(ge=1, le=1 << 30)
    num_key_value_heads: int | None = rule(None, ge=1, le=1 << 14)
    head_dim: int | None = rule(None, ge=1, le=1 << 14)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    num_local_experts: int = rule(1, ge=1, le=1 << 14)
    num_experts_per_tok: int = rule(1, ge=1, le=1 << 14)
    final_logit_softcapping: float | None = rule(None, gt=0, le=1e6)
    attn_logit_softcapping: float | None = rule(None, gt=0, le=1e6)

    def check(self, where: str) -> None:
        heads, kv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
        if heads % kv:
            raise InputError(
                f"{where}: field 'num_key_value_heads' is {kv}; expected a divisor of num_attention_heads "
                f"({heads}): each key/value head serves a whole group of query heads"
            )
        if self.model_type in ("llama", "gemma2") and self.hidden_size % heads:
            # LlamaConfig / Gemma2Config.validate_architecture refuse this
            raise InputError(
                f"{where}: field 'hidden_size' is {self.hidden_size}; expected a multiple of num_attention_heads "
                f"({heads}), as transformers' {self.model_type} config requires"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise InputError(
                f"{where}: field 'num_experts_per_tok' is {self.num_experts_per_tok}; expected at most "
                f"num_local_experts ({self.num_local_experts}): a token cannot be routed to more experts than exist"
            )


# the largest model the planner accepts: 20 T parameters, 10x the largest published dense or MoE model
MAX_TOTAL_PARAMS = 20 * 10**12


# A decoder outside the modelled families is planned as a Llama-like one when its config.json has these fields (the
# ones every transformers decoder config names the same way); what it has beyond them is not counted.
GENERIC_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# config keys that mean experts (Qwen-MoE, DeepSeek, gpt-oss, GLM, Granite-MoE, Llama-4 spell them differently):
# a dense Llama-like plan of such a model would miss most of its weights, so it is refused instead
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def model_from_config(cfg: dict, name: str, where: str, **meta) -> ModelSpec:
    """Build a ModelSpec from config.json fields, with transformers' defaults for the fields it leaves out. A
    multimodal config plans its language model (`text_config`); another decoder with the standard fields is
    planned as a Llama-like one (the spec's `planned_as` says so)."""
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: expected a JSON object of config.json fields, found {type_name(cfg)}")
    mt = cfg.get("model_type")
    if isinstance(mt, str) and mt.strip() and mt not in CONFIG_DEFAULTS:
        return _outside_families(cfg, mt, name, where, **meta)
    if not isinstance(mt, str) or mt not in CONFIG_DEFAULTS:  # not a string, or empty
        raise InputError(f"{where}: field 'model_type' is {shown(mt)}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    defaults = CONFIG_DEFAULTS[mt]
    given = {
        k: v
        for k, v in cfg.items()
        if (k in defaults or k == "head_dim") and not (v is None and k in _NULL_MEANS_DERIVED)
    }
    f = load(ConfigFields, {**defaults, **given, "model_type": mt}, where)
    heads = f.num_attention_heads
    experts = f.num_local_experts if mt == "mixtral" else 1
    spec = ModelSpec(
        name=name,
        model_type=mt,
        hidden_size=f.hidden_size,
        intermediate_size=f.intermediate_size,
        num_layers=f.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=f.num_key_value_heads or heads,
        head_dim=f.head_dim or f.hidden_size // heads,
        vocab_size=f.vocab_size,
        tie_word_embeddings=f.tie_word_embeddings,
        max_position_embeddings=f.max_position_embeddings,
        # Qwen2Attention always has q/k/v biases; Llama follows `attention_bias` for q/k/v/o, Gemma-2 too.
        qkv_bias=True if mt == "qwen2" else (f.attention_bias if mt in ("llama", "gemma2") else False),
        o_bias=f.attention_bias if mt in ("llama", "gemma2") else False,
        mlp_bias=f.mlp_bias if mt == "llama" else False,
        num_experts=experts,
        experts_per_token=f.num_experts_per_tok if experts > 1 else 1,
        final_logit_softcapping=f.final_logit_softcapping if mt == "gemma2" else None,
        attn_logit_softcapping=f.attn_logit_softcapping if mt == "gemma2" else None,
        defaulted=tuple((k, defaults[k]) for k in MEMORY_FIELDS if defaults.get(k) is not None and cfg.get(k) is None),
        config=cfg,
        **meta,
    )
    if spec.total_params > MAX_TOTAL_PARAMS:
        raise InputError(
            f"{where}: these fields describe a model of {spec.total_params / 1e12:,.0f} T parameters; expected at "
            f"most {MAX_TOTAL_PARAMS // 10**12} T (check hidden_size, intermediate_size, num_hidden_layers, "
            "vocab_size)"
        )
    return spec


def _outside_families(cfg: dict, mt: str, name: str, where: str, **meta) -> ModelSpec:
    text = cfg.get("text_config")
    if isinstance(text, dict):  # a vision-language (or audio) model: the language model is what LoRA trains
        top = {k: cfg[k] for k in ("tie_word_embeddings",) if k in cfg}  # some models set it at the top level
        inner = {**top, **text}
        inner.setdefault("model_type", f"{mt}_text")
        spec = model_from_config(inner, name, f"{where}: text_config", **meta)
        said = (
            f"{mt}: planned its language model only (text_config); the vision / audio tower and projector are not "
            "counted (frozen, they add their weights in the base dtype)"
        )
        return dataclasses.replace(
            spec, planned_as=said + (f". {spec.planned_as}" if spec.planned_as else ""), config=cfg
        )
    experts = [k for k in MOE_KEYS if isinstance(cfg.get(k), int) and cfg.get(k) > 1]
    if experts:
        raise InputError(
            f"{where}: model_type {shown(mt)} is a mixture of experts ({experts[0]} {cfg[experts[0]]}); qlora-bench "
            f"plans MoE models of the families it models ({', '.join(SUPPORTED_MODEL_TYPES)}) and dense decoders of "
            "any other: `qlora-bench plan --trace` runs the real model (train extra)"
        )
    missing = [k for k in GENERIC_FIELDS if k not in cfg]
    if missing:
        raise InputError(
            f"{where}: model_type {shown(mt)} is not a family qlora-bench models ({', '.join(SUPPORTED_MODEL_TYPES)}) "
            f"and its config lacks {', '.join(missing)} to plan it as a Llama-like decoder"
        )
    generic = {k: cfg[k] for k in CONFIG_DEFAULTS["llama"] if k in cfg}
    spec = model_from_config({**generic, "model_type": "llama"}, name, where, **meta)
    return dataclasses.replace(
        spec,
        planned_as=f"model_type {mt!r} is not a family qlora-bench models exactly: planned as a Llama-like decoder "
        "from config.json's standard fields (q/k/v/o and gate/up/down projections, RMSNorm, rotary attention); "
        "what it has beyond them (q/k norms, sliding or linear attention, extra projections) is not counted"
        + ("" if "tie_word_embeddings" in cfg else "; tie_word_embeddings is not set: planned with a separate lm_head")
        + ". `qlora-bench plan --trace` runs the real model (train extra)",
        defaulted=(),
        config=cfg,
    )


# ---- model resolution ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelProfile:
    """A file in profiles/models/: config.json fields of a published model, with where they came from."""

    name: str = rule(pattern=r"[a-z0-9][a-z0-9._-]{0,99}", hint="a lower-case profile name")
    source: str = rule(nonempty=True, hint="where the config.json fields came from")
    config: dict = rule(nonempty=True, hint="the model's config.json fields")
    aliases: list[str] = rule(factory=list, max_len=100)
    hf_id: str | None = None
    note: str | None = None
    path: str = ""  # the file it was read from (set by the loader, not in the file)


@cache
def _model_profiles() -> dict[str, ModelProfile]:
    out = {}
    for path in sorted((profiles_dir() / "models").glob("*.json")):
        data = read_json_object(path, "model profile")
        p = load(ModelProfile, {k: v for k, v in data.items() if k != "path"}, str(path))
        out[p.name] = dataclasses.replace(p, path=str(path))
    return out


@cache
def _model_index() -> dict[str, str]:
    """lower-cased name / alias / hub id -> profile name."""
    idx = {}
    for name, p in _model_profiles().items():
        for key in [name, *p.aliases, p.hf_id or ""]:
            if key:
                idx[key.lower()] = name
    return idx


def model_names() -> list[str]:
    return list(_model_profiles())


def profile_name(arg: str) -> str | None:
    """The profile a name, alias or hub id stands for ('8b' -> 'llama-3.1-8b'), or None."""
    return _model_index().get(arg.strip().lower())


def model_profile(name: str) -> ModelProfile:
    return _model_profiles()[name]


@cache
def load_model_profile(name: str) -> ModelSpec:
    p = _model_profiles()[name]
    return model_from_config(p.config, name, p.path, source=p.source, hf_id=p.hf_id, note=p.note)


# Hub repositories that hold the same architecture as a profile's: chat / instruction tunes, mirrors and
# pre-quantized uploads keep the base model's config (only weights differ). Stripped before matching.
_VARIANT_SUFFIXES = re.compile(r"(-(instruct|it|chat|hf|base|bnb-4bit|unsloth-bnb-4bit|4bit|2507|fp8))+$")


def _repo_key(repo: str) -> str:
    """'NousResearch/Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b': the name part, without the owner, a 'Meta-'
    prefix and variant suffixes, lower-cased."""
    name = repo.strip().rsplit("/", 1)[-1].lower()
    return _VARIANT_SUFFIXES.sub("", name.removeprefix("meta-"))


def model_for_trainer(ref: str) -> tuple[str, str]:
    """The --model argument for a base model as a trainer's config names it, and a note saying how it was
    resolved: a profile (by name, alias or hub id, or as a variant of a profile's hub repository: offline), else
    the reference itself (a local path, or a hub id fetched from the hub)."""
    if profile_name(ref):
        return ref, f"base model {ref} -> profile {profile_name(ref)}"
    if _HUB_ID.fullmatch(ref.strip()) and not os.path.lexists(ref):
        key = _repo_key(ref)
        for name, p in _model_profiles().items():
            if (p.hf_id and _repo_key(p.hf_id) == key) or key in (name, *p.aliases):
                # instruction-tuned, mirrored and pre-quantized repositories keep their base model's config
                return name, f"base model {ref} -> profile {name} (the architecture of {p.hf_id or name})"
    return ref, f"base model {ref}"


def _read_config_file(path: Path) -> ModelSpec:
    if file_kind(path) == "a folder":
        if file_kind(path / "config.json") == "missing":
            raise InputError(f"{path}: a folder without config.json; give the model's config.json or its folder")
        path = path / "config.json"
    cfg = read_json(path, "config.json")
    name = path.parent.name if path.name == "config.json" else path.stem
    return model_from_config(cfg, name or str(path), str(path), source=f"local file {path}")


# A hub id is `owner/name`, each at most 96 characters of letters, digits, '-', '_', '.' (huggingface_hub's
# REPO_ID_REGEX and its length check in validate_repo_id)
_HUB_ID = re.compile(r"[\w.-]{1,96}/[\w.-]{1,96}", re.ASCII)


def _fetch_hub_config(repo_id: str) -> ModelSpec:
    url = f"https://huggingface.co/{repo_id}/resolve/main/config.json"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (fixed https host)
            text = resp.read(1 << 20).decode("utf-8", errors="replace")
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(
            f"cannot fetch config.json for hub id '{repo_id}' ({reason}); offline? download its config.json "
            "and pass the file path, or use a built-in profile (qlora-bench profiles)"
        ) from None
    cfg = parse_json(text, f"hub:{repo_id}")
    return model_from_config(cfg, repo_id, f"hub:{repo_id}", source=f"{url}", hf_id=repo_id)


def _local_path(arg: str) -> Path | None:
    """`arg` as a path that exists (or names a .json file), or None. A path the OS cannot even look at (a name
    too long, a '~user' that does not exist, a NUL byte) is not a path the user meant to give."""
    try:
        path = Path(arg).expanduser()
    except RuntimeError:  # '~nosuchuser/...'
        path = Path(arg)
    if "\0" in arg:
        raise InputError(f"--model {shown(arg)}: not a usable file path (a NUL character)")
    if os.path.lexists(path):
        return path
    return path if arg.endswith(".json") else None


def resolve_model(arg: str) -> ModelSpec:
    """A profile name or alias, a local config.json (file or folder), or a hub id (needs network)."""
    key = arg.strip().lower()
    if not key:
        raise InputError("--model is empty: give a profile name (qlora-bench profiles), a config.json or a hub id")
    if key in _model_index():
        return load_model_profile(_model_index()[key])
    path = _local_path(arg)
    if path is not None:
        return _read_config_file(path)
    if _HUB_ID.fullmatch(arg):
        return _fetch_hub_config(arg)
    hint = closest(key[:100], list(_model_index()))
    raise InputError(
        f"unknown model {shown(arg)}"
        + (f"; closest profiles: {', '.join(hint)}" if hint else "")
        + " (see `qlora-bench profiles`; a config.json path or hub id also works)"
    )


# ---- GPUs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuProfile:
    """A file in profiles/gpus/: a board's memory as NVML reports it and its datasheet throughput."""

    name: str = rule(pattern=r"[a-z0-9][a-z0-9._-]{0,99}", hint="a lower-case profile name")
    memory_total_MiB: int = rule(ge=1, le=1 << 24, hint="NVML memory.total in MiB")
    memory_source: str = rule(nonempty=True)
    bf16_supported: bool = rule()
    aliases: list[str] = rule(factory=list, max_len=100)
    device_name: str = ""
    dense_bf16_TFLOPS: float | None = rule(None, gt=0, le=1e5)
    dense_fp16_TFLOPS: float | None = rule(None, gt=0, le=1e5)
    memory_bandwidth_GBps: float | None = rule(None, gt=0, le=1e6)
    throughput_source: str | None = None
    launch_year: int | None = rule(None, ge=2000, le=2100, hint="year NVIDIA launched the board")
    launch_source: str | None = None
    # a typical on-demand rental price per GPU-hour, with where and when it was posted (prices move: plan --price)
    price_per_hour_usd: float | None = rule(None, gt=0, le=1000, hint="US dollars per GPU-hour")
    price_source: str | None = None
    price_date: str | None = rule(None, pattern=r"\d{4}-\d{2}(-\d{2})?", hint="YYYY-MM")


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
    launch_year: int | None = None
    price_per_hour: float | None = None  # US dollars per GPU-hour (profile, or plan --price)
    price_source: str | None = None

    @property
    def label(self) -> str:
        return f"{self.count}x {self.name}" if self.count > 1 else self.name


@cache
def _gpu_profiles() -> dict[str, GpuProfile]:
    out = {}
    for path in sorted((profiles_dir() / "gpus").glob("*.json")):
        p = load(GpuProfile, read_json_object(path, "GPU profile"), str(path))
        out[p.name] = p
    return out


@cache
def _gpu_index() -> dict[str, str]:
    idx = {}
    for name, p in _gpu_profiles().items():
        for key in [name, *p.aliases]:
            idx[key.lower()] = name
    return idx


def gpu_names() -> list[str]:
    return list(_gpu_profiles())


def gpu_profile(name: str) -> GpuProfile:
    return _gpu_profiles()[name]


def _gpu_from_profile(name: str, count: int) -> GpuSpec:
    d = _gpu_profiles()[name]
    return GpuSpec(
        name=name,
        memory_total_bytes=d.memory_total_MiB * MiB,
        count=count,
        device_name=d.device_name,
        bf16_supported=d.bf16_supported,
        dense_tflops=d.dense_bf16_TFLOPS or d.dense_fp16_TFLOPS,
        memory_bandwidth_GBps=d.memory_bandwidth_GBps,
        launch_year=d.launch_year,
        price_per_hour=d.price_per_hour_usd,
        price_source=f"{d.price_source} ({d.price_date})" if d.price_per_hour_usd else None,
    )


def gpu_from_device_name(device_name: str | None) -> GpuSpec | None:
    """The profile whose `device_name` is what torch / NVML report for this board (e.g. records' gpu_name)."""
    if not device_name or not isinstance(device_name, str):
        return None
    for name, d in _gpu_profiles().items():
        if d.device_name.lower() == device_name.lower():
            return _gpu_from_profile(name, 1)
    return None


MAX_GPUS = 64  # one job's GPU count: 8 nodes of 8; beyond that the plan is a cluster question, not a memory one
_COUNT = re.compile(r"^(\d+)\s*[x*]\s*(.*)$")
_SIZE = re.compile(r"^(\d{1,5}(?:\.\d{1,3})?)(gb|gib|g)$")
GPU_HELP = "a profile (h100, rtx-4090; see qlora-bench profiles), a size (24gb, 48GiB) or a count (2x24gb, 2xh100)"


def resolve_gpu(arg: str) -> GpuSpec:
    """'h100', 'rtx-4090', '48gb', '24GiB', '80 GB', '2x24gb', '2xh100'.

    A bare size is read as the marketed size, which for GPU memory is binary: a "48 GB" board reports
    ~48 GiB (RTX A6000: 49,140 MiB), so '48gb' and '48GiB' both mean 48 GiB.
    """
    key = arg.strip().lower().replace("_", "-")
    if not key:
        raise InputError(f"--gpu is empty: give {GPU_HELP}")
    count = 1
    m = _COUNT.match(key)
    if m:
        digits, key = m.group(1), m.group(2).strip()
        if len(digits) > 3 or not 1 <= int(digits) <= MAX_GPUS:
            raise InputError(f"GPU count in {shown(arg)} must be between 1 and {MAX_GPUS}")
        if not key:
            raise InputError(f"--gpu {shown(arg)}: say which GPU after the count, e.g. 2x24gb or 2xh100")
        count = int(digits)
    if key in _gpu_index():
        return _gpu_from_profile(_gpu_index()[key], count)
    compact = key.replace(" ", "")
    m = _SIZE.match(compact)
    if m:
        size = float(m.group(1))
        if not 1 <= size <= 1024:
            raise InputError(f"GPU memory {shown(arg)} is out of range: give 1-1024 GB per GPU (e.g. 24gb, 2x24gb)")
        return GpuSpec(name=f"{size:g}GiB", memory_total_bytes=int(size * GiB), count=count, generic=True)
    if re.fullmatch(r"\d+(\.\d+)?", compact):
        sized = f"{compact}gb" if len(compact) <= 8 else "24gb"
        raise InputError(f"--gpu {shown(arg)}: a size needs a unit: {sized} (or {compact[:8]}GiB); or a profile name")
    if re.fullmatch(r"\d+(\.\d+)?(tb|tib|t|mb|mib|m|kb)", compact):
        raise InputError(f"GPU memory {shown(arg)}: use GB or GiB per GPU (e.g. 48gb, 24GiB, 2x24gb)")
    hint = closest(key[:100], list(_gpu_index()))
    raise InputError(
        f"unknown GPU {shown(arg)}"
        + (f"; closest profiles: {', '.join(hint)}" if hint else "")
        + "; or give a size such as 24gb, 48GiB, 2x24gb"
    )


def slug_for(gpu_name: str | None) -> str:
    """Folder / file name for a GPU model: 'h100' for 'NVIDIA H100 80GB HBM3', 'geforce-rtx-4090', or 'cpu'."""
    if not gpu_name or not isinstance(gpu_name, str):
        return "cpu"
    words = gpu_name.lower().replace("nvidia", "").split()
    if words and words[0] in ("h100", "h200", "b200", "gh200"):
        return words[0]
    return re.sub(r"[^a-z0-9._-]+", "-", "-".join(words))[:64].strip("-.") or "gpu"


def gpu_slug() -> str:
    """slug_for() the GPU in this machine (NVML), or 'cpu'."""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return slug_for(name.decode() if isinstance(name, bytes) else name)
    except Exception:
        return "cpu"
