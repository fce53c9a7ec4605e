"""The one Settings type shared by plan, run, sweep, result records and validation.

Defaults follow the common QLoRA recipe (QLoRA paper + peft/TRL examples): NF4, double quantization, bf16
compute, LoRA r=16 alpha=32 dropout 0.05 on all linear projections, paged 8-bit AdamW, gradient
checkpointing, micro-batch 1, 2048 tokens, sdpa attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from .errors import InputError
from .schema import FLAGS, check_fields, load, rule

METHODS = ("qlora", "lora", "full")
QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("bf16", "fp16", "fp32")
ATTN = ("sdpa", "eager", "flash_attention_2")

# HF TrainingArguments `optim` names -> canonical optimizer. Aliases are the names transformers accepts
# for the same bitsandbytes class (adamw_8bit and adamw_bnb_8bit both build bnb.optim.AdamW8bit).
OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_8bit": "adamw_8bit",
    "adamw_bnb_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
}

TARGET_PRESETS = ("all-linear", "attn", "mlp")

# Optimizer when none is named: the QLoRA recipe's paged 8-bit AdamW; for LoRA and full fine-tuning the HF
# Trainer's default on current torch (adamw_torch_fused).
DEFAULT_OPTIMIZER = {"qlora": "paged_adamw_8bit", "lora": "adamw_torch_fused", "full": "adamw_torch_fused"}


# Bounds where the physics has them. A micro-batch, sequence or accumulation beyond these is a typo, not a plan:
# 2^24 tokens is 16x the longest context any profiled model supports; 2^16 is beyond any LoRA rank in use
# (LoRA paper: r <= 64; rsLoRA experiments go to 2048) and the module's own width bounds it further.
MAX_BATCH = 1 << 20
MAX_SEQ = 1 << 24
MAX_GRAD_ACCUM = 1 << 20
MAX_RANK = 1 << 16
MAX_TOKENS_PER_STEP = 1 << 30


def canonical_targets(targets: str) -> str:
    """'q_proj, v_proj,q_proj' -> 'q_proj,v_proj'; presets lower-cased. Module names are case-sensitive (peft
    matches them as written), so only presets are folded."""
    if not isinstance(targets, str):
        return targets  # the schema check names the wrong type
    names = [n.strip() for n in targets.split(",")]
    if len(names) == 1 and names[0].lower() in TARGET_PRESETS:
        return names[0].lower()
    if not all(names):
        return targets  # an empty name: left as given, for the schema to refuse and show
    return ",".join(dict.fromkeys(names))  # dict keeps the first of duplicates, in order


def canonical_alloc_conf(text: str) -> str:
    """'max_split_size_mb:512, expandable_segments:true' -> torch's spelling in a fixed order; text that does not
    parse is left as given, for `check` to refuse with a message."""
    if not isinstance(text, str) or not text.strip():
        return "" if isinstance(text, str) else text
    from .estimate.allocator import AllocatorConfig  # pure Python; imported late: settings sits below estimate

    try:
        return AllocatorConfig.parse(text).to_text()
    except InputError:
        return text


@dataclass(frozen=True)
class Settings:
    method: Literal[METHODS] = "qlora"
    quant: Literal[QUANT_TYPES] = "nf4"
    double_quant: bool = True
    # bitsandbytes quantize_4bit blocksizes (powers of two, 32..4096); 64 is its default
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    compute_dtype: Literal[DTYPES] = "bf16"
    rank: int = rule(16, ge=1, le=MAX_RANK, hint="LoRA rank")
    alpha: float = rule(32, gt=0, le=1e6, hint="LoRA alpha")
    dropout: float = rule(0.05, ge=0, lt=1, hint="LoRA dropout")
    targets: str = rule(
        "all-linear",
        nonempty=True,
        max_len=2000,
        pattern=r"[\w.*-]+(,[\w.*-]+)*",
        hint="all-linear, attn, mlp or a comma list of module names such as q_proj,v_proj",
    )
    optimizer: Literal[tuple(OPTIMIZERS)] = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    batch: int = rule(1, ge=1, le=MAX_BATCH, hint="micro-batch size")
    seq: int = rule(2048, ge=1, le=MAX_SEQ, hint="tokens per sequence")
    grad_accum: int = rule(1, ge=1, le=MAX_GRAD_ACCUM, hint="gradient accumulation steps")
    attn: Literal[ATTN] = "sdpa"
    upcast_non_quantized: bool = True
    # PYTORCH_CUDA_ALLOC_CONF of the training process ('' = torch's defaults): the caching allocator's settings
    # change the reserved peak (expandable_segments, max_split_size_mb, ...); estimate/allocator.py models them
    alloc_conf: str = rule("", max_len=1000, hint="PYTORCH_CUDA_ALLOC_CONF text, e.g. expandable_segments:True")

    def __post_init__(self):
        object.__setattr__(self, "targets", canonical_targets(self.targets))
        object.__setattr__(self, "alloc_conf", canonical_alloc_conf(self.alloc_conf))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "settings") -> Settings:
        """Settings from a record, sweep entry or file: every field type- and range-checked (schema.load)."""
        return load(cls, d, where)

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    @property
    def optimizer_kind(self) -> str:
        return OPTIMIZERS[self.optimizer]

    @property
    def uses_adapters(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq

    def validated(self, where: str = "settings") -> Settings:
        """Return self, or raise InputError naming the impossible value and what would be right."""
        check_fields(self, where)
        self.check(where)
        return self

    def check(self, where: str) -> None:
        """Rules between fields (schema.load calls this after the per-field checks)."""
        if self.method != "qlora" and self.quant != "nf4":
            raise InputError(f"{where}: quant '{self.quant}' applies only to method qlora (method is {self.method})")
        if self.alloc_conf:
            from .estimate.allocator import AllocatorConfig

            try:
                AllocatorConfig.parse(self.alloc_conf)
            except InputError as e:
                name = "--alloc-conf" if where == FLAGS else f"{where}: field 'alloc_conf'"
                raise InputError(f"{name}: {e}") from None
        if self.tokens_per_step > MAX_TOKENS_PER_STEP:
            raise InputError(
                f"{where}: batch {self.batch} x seq {self.seq} = {self.tokens_per_step:,} tokens per micro-batch; "
                f"expected at most {MAX_TOKENS_PER_STEP:,} (2^30)"
            )

    def describe(self) -> str:
        """One line a person reads: the settings that change memory most."""
        parts = [self.method]
        if self.method == "qlora":
            parts.append(self.quant + ("+dq" if self.double_quant else ""))
        if self.uses_adapters:
            parts.append(f"r={self.rank}")
        parts += [
            f"{self.batch}x{self.seq}",
            self.optimizer,
            "gc" if self.gradient_checkpointing else "no-gc",
            self.attn,
        ]
        if self.compute_dtype != "bf16":
            parts.append(self.compute_dtype)
        if self.alloc_conf:
            parts.append(self.alloc_conf)
        return " ".join(parts)
