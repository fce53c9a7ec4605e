"""The one Settings type shared by plan, run, sweep, result records and validation.

Defaults follow the common QLoRA recipe (QLoRA paper + peft/TRL examples): NF4, double quantization, bf16
compute, LoRA r=16 alpha=32 dropout 0.05 on all linear projections, paged 8-bit AdamW, gradient
checkpointing, micro-batch 1, 2048 tokens, sdpa attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import InputError

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


@dataclass(frozen=True)
class Settings:
    method: str = "qlora"
    quant: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64  # bitsandbytes quantize_4bit default
    compute_dtype: str = "bf16"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: str = "all-linear"
    optimizer: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    batch: int = 1
    seq: int = 2048
    grad_accum: int = 1
    attn: str = "sdpa"
    upcast_non_quantized: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Settings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d).validated()

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

    def validated(self) -> Settings:
        """Return self, or raise InputError naming the impossible value and what would be right."""
        if self.method not in METHODS:
            raise InputError(f"method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.quant not in QUANT_TYPES:
            raise InputError(f"quant '{self.quant}' is not one of {', '.join(QUANT_TYPES)}")
        if self.compute_dtype not in DTYPES:
            raise InputError(f"compute dtype '{self.compute_dtype}' is not one of {', '.join(DTYPES)}")
        if self.attn not in ATTN:
            raise InputError(f"attention '{self.attn}' is not one of {', '.join(ATTN)}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer '{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise InputError(
                f"blocksize {self.blocksize} is not a bitsandbytes 4-bit blocksize (32..4096, powers of 2)"
            )
        for name in ("batch", "seq", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.uses_adapters:
            if not isinstance(self.rank, int) or self.rank < 1:
                raise InputError(f"rank must be a positive integer, got {self.rank!r}")
            if self.alpha <= 0:
                raise InputError(f"alpha must be positive, got {self.alpha!r}")
            if not 0 <= self.dropout < 1:
                raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
            if not self.targets.strip():
                raise InputError("targets is empty: use all-linear, attn, mlp or a comma list such as q_proj,v_proj")
        if self.method != "qlora" and self.quant != "nf4":
            raise InputError(f"quant '{self.quant}' applies only to method qlora (method is {self.method})")
        return self

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
        return " ".join(parts)
