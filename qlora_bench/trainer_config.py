"""Plan from the config file a trainer reads: Axolotl YAML, TRL's `trl sft --config` YAML, LLaMA-Factory YAML, or a
transformers TrainingArguments JSON (`TrainingArguments.to_json_string()`).

People describe a run in their trainer's words, not in our flags. `read` detects which trainer a file is for, maps
the keys that set memory or speed to Settings, and keeps account of every other key: keys that change memory but
are not modelled (DeepSpeed, FSDP, Liger kernels, DoRA, ...) are named with what they change; keys that change
neither (learning rate, logging, data sets) and keys it does not know are listed, never dropped silently. Settings
a file leaves out take the trainer's own default (each with its source below), not ours: a TRL run without
`gradient_checkpointing` checkpoints; one through bare TrainingArguments does not.

Pure Python (PyYAML for .yaml files; JSON is read without it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, parse_json, parse_yaml, read_text, shown, type_name
from .settings import OPTIMIZERS, Settings

TOOLS = ("axolotl", "trl", "llama-factory", "transformers")
TOOL_NAMES = {
    "axolotl": "Axolotl",
    "trl": "TRL (trl sft --config)",
    "llama-factory": "LLaMA-Factory",
    "transformers": "transformers TrainingArguments",
}


@dataclass
class TrainerConfig:
    """What a trainer's config file says, in Settings' words, with an account of every key."""

    tool: str
    path: str
    model: str | None  # the base model as the file names it (hub id or path); None: the file does not say
    values: dict  # Settings fields (and "epochs") the file sets or its trainer defaults
    read_from: dict  # Settings field -> "key: value" or "default: why" (what `plan` shows)
    not_modelled: list[str] = field(default_factory=list)  # "key: what it changes that the plan does not count"
    no_effect: list[str] = field(default_factory=list)  # keys that change neither memory nor speed
    unknown: list[str] = field(default_factory=list)  # keys this reader does not know

    # Settings fields the file leaves open (TRL's `max_length: null`: no truncation) -> what to give instead
    missing: dict = field(default_factory=dict)

    def settings(self, base: Settings, overrides: set[str] = frozenset()) -> Settings:
        """`base` (the command line's settings) with the file's values, except the fields in `overrides` (flags
        given on the command line win over the file); a value out of range is named by the key it came from."""
        changes = {k: v for k, v in self.values.items() if k in Settings.__dataclass_fields__ and k not in overrides}
        for k, v in changes.items():
            src = self.read_from[k]
            key = src.split(":")[0]
            where = (
                f"{self.path}: {src}" if key in ("default", "trainer") or "," in src else f"{self.path}: key '{key}'"
            )
            base.with_(**{k: v}).validated(where)
        return base.with_(**changes).validated(self.path)

    def to_dict(self) -> dict:
        return {
            "tool": self.tool,
            "path": self.path,
            "model": self.model,
            "values": self.values,
            "read_from": self.read_from,
            "not_modelled": self.not_modelled,
            "no_effect": self.no_effect,
            "unknown": self.unknown,
            "missing": self.missing,
        }


# ---- reading --------------------------------------------------------------------------------------------------
def load_file(path: str | Path) -> dict:
    """The file's top-level mapping (YAML, or JSON for .json files)."""
    text = read_text(path, "trainer config file")
    if str(path).lower().endswith(".json"):
        data = parse_json(text, str(path))
    else:
        data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of trainer settings (key: value lines), found {type_name(data)}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise InputError(f"{path}: key {shown(bad[0])} is not a name; trainer config keys are names like lora_r")
    return data


class _Keys:
    """The file's keys, each taken once: what is left at the end is reported, never dropped."""

    def __init__(self, data: dict, where: str):
        self.data, self.where = data, where
        self.taken: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str):
        self.taken.add(key)
        return self.data.get(key)

    def get(self, key: str, kind: str, default=None):
        """The value of `key` checked as `kind` (bool, int, number, str, list, str-or-list), or `default` when the
        key is absent or null."""
        v = self.raw(key)
        if v is None:
            return default
        ok = {
            "bool": isinstance(v, bool),
            "int": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, int | float) and not isinstance(v, bool),
            "str": isinstance(v, str),
            "list": isinstance(v, list) and all(isinstance(x, str) for x in v),
            "str-or-list": isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
            "bool-or-str": isinstance(v, bool | str),
        }[kind]
        if kind == "bool" and isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"  # `bf16: "true"` in hand-written YAML
        if kind == "int" and isinstance(v, str) and re.fullmatch(r"\d{1,9}", v.strip()):
            return int(v)
        if not ok:
            expected = {
                "bool": "true or false",
                "int": "a whole number",
                "number": "a number",
                "str": "a string",
                "list": "a list of names",
                "str-or-list": "a name or a list of names",
                "bool-or-str": "true, false or a name",
            }[kind]
            raise InputError(f"{self.where}: key '{key}' is {shown(v)}; expected {expected}")
        return v

    def rest(self) -> list[str]:
        return [k for k in self.data if k not in self.taken]


class _Reading:
    """Collects one file's Settings values, where each came from, and the account of the other keys."""

    def __init__(self, tool: str, data: dict, where: str):
        self.tool, self.where = tool, where
        self.keys = _Keys(data, where)
        self.values: dict = {}
        self.read_from: dict = {}
        self.not_modelled: list[str] = []
        self.no_effect: list[str] = []
        self.unknown: list[str] = []
        self.missing: dict = {}

    def set(self, field_name: str, value, why: str) -> None:
        self.values[field_name] = value
        self.read_from[field_name] = why

    def default(self, field_name: str, table: dict) -> None:
        """The trainer's own default (or behaviour) for a setting the file leaves out, with its source."""
        value, source = table[field_name]
        self.set(field_name, value, f"{'trainer' if field_name == 'upcast_non_quantized' else 'default'}: {source}")

    def from_key(self, field_name: str, key: str, value) -> None:
        self.set(field_name, value, f"{key}: {_plain(self.keys.data.get(key))}")

    def unmodelled(self, key: str, what: str) -> None:
        """`key` is set to something that changes memory or speed in a way the plan does not count."""
        self.keys.raw(key)
        self.not_modelled.append(f"{key} ({what})")

    def ignore(self, *keys: str) -> None:
        """Keys that change neither memory nor speed (those not already read), in the file's order."""
        wanted = set(keys)
        for k in self.keys.data:
            if k in wanted and k not in self.keys.taken:
                self.keys.raw(k)
                self.no_effect.append(k)

    def done(self, model: str | None, known: set[str]) -> TrainerConfig:
        rest = self.keys.rest()
        return TrainerConfig(
            tool=self.tool,
            path=self.where,
            model=model,
            values=self.values,
            read_from=self.read_from,
            not_modelled=self.not_modelled,
            no_effect=self.no_effect + [k for k in rest if k in known],
            unknown=self.unknown + [k for k in rest if k not in known],
            missing=self.missing,
        )


def _plain(v) -> str:
    if isinstance(v, str):
        return v if len(v) <= 60 else v[:57] + "..."
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    return shown(v, 40)


def _epochs(r: _Reading, key: str) -> bool:
    """Epochs for the cost line, as `--epochs` takes them (0 < epochs <= 10^6); True when the file sets them."""
    v = r.keys.get(key, "number")
    if v is None:
        return False
    if not 0 < v <= 1e6:  # also NaN
        raise InputError(f"{r.where}: key '{key}' is {shown(v)}; expected a number of epochs above 0 (at most 10^6)")
    r.from_key("epochs", key, float(v))
    return True


def _optimizer(r: _Reading, key: str) -> None:
    name = r.keys.get(key, "str")
    if name is None:
        return
    canon = name.strip().lower()
    if canon not in OPTIMIZERS:
        r.unmodelled(
            key,
            f"'{name}' is not among the modelled optimizers ({', '.join(OPTIMIZERS)}); planned with "
            "the trainer's default optimizer",
        )
        return
    r.from_key("optimizer", key, canon)


def _targets(value) -> str:
    """A trainer's target-module value -> Settings.targets ('all-linear' or a comma list)."""
    if isinstance(value, str):
        v = value.strip()
        return "all-linear" if v.lower() in ("all-linear", "all") else v
    return ",".join(value)


def _attention_from_name(r: _Reading, key: str, name: str) -> None:
    n = name.strip().lower()
    attn = {
        "sdpa": "sdpa",
        "eager": "eager",
        "flash_attention_2": "flash_attention_2",
        "fa2": "flash_attention_2",
        "flash_attn": "flash_attention_2",
    }.get(n)
    if attn is None:
        r.unmodelled(key, f"attention '{name}' is not modelled (sdpa, eager, flash_attention_2 are); planned as sdpa")
        r.set("attn", "sdpa", f"{key}: {name} (not modelled; sdpa assumed)")
        return
    r.from_key("attn", key, attn)


def _precision(r: _Reading, defaults: dict) -> None:
    """bf16 / fp16 (true, false or auto) -> compute_dtype; neither set: the trainer's default in `defaults`."""
    bf16 = r.keys.get("bf16", "bool-or-str")
    fp16 = r.keys.get("fp16", "bool-or-str")

    def on(v) -> bool:  # auto: on where the GPU has it (every profiled GPU has bf16 but the T4)
        return v is True or (isinstance(v, str) and v.strip().lower() in ("true", "auto"))

    if on(bf16):
        r.from_key("compute_dtype", "bf16", "bf16")
    elif on(fp16):
        r.from_key("compute_dtype", "fp16", "fp16")
    elif "compute_dtype" in defaults:
        r.default("compute_dtype", defaults)


# ---- the four trainers ---------------------------------------------------------------------------------------
# Keys that change neither memory nor speed of a step, common to the HF Trainer family (TrainingArguments fields):
# logging, saving, evaluation, the schedule, the hub. Listed as "not used (no effect)", never dropped.
TRAINING_ARGS_NO_EFFECT = {
    "output_dir",
    "overwrite_output_dir",
    "do_train",
    "do_eval",
    "do_predict",
    "eval_strategy",
    "evaluation_strategy",
    "prediction_loss_only",
    "per_device_eval_batch_size",
    "eval_accumulation_steps",
    "eval_delay",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "max_steps",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_ratio",
    "warmup_steps",
    "log_level",
    "log_level_replica",
    "log_on_each_node",
    "logging_dir",
    "logging_strategy",
    "logging_first_step",
    "logging_steps",
    "logging_nan_inf_filter",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "save_safetensors",
    "save_on_each_node",
    "save_only_model",
    "seed",
    "data_seed",
    "eval_steps",
    "dataloader_num_workers",
    "dataloader_drop_last",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "run_name",
    "disable_tqdm",
    "remove_unused_columns",
    "label_names",
    "load_best_model_at_end",
    "metric_for_best_model",
    "greater_is_better",
    "ignore_data_skip",
    "report_to",
    "push_to_hub",
    "resume_from_checkpoint",
    "hub_model_id",
    "hub_strategy",
    "hub_token",
    "hub_private_repo",
    "hub_always_push",
    "include_num_input_tokens_seen",
    "neftune_noise_alpha",
    "ddp_timeout",
    "ddp_backend",
    "ddp_find_unused_parameters",
    "local_rank",
    "full_determinism",
    "group_by_length",
    "length_column_name",
    "optim_args",
    "adafactor",
    "tf32",
    "use_cpu",
    "torch_compile_backend",
    "torch_compile_mode",
    "gradient_checkpointing_kwargs",
    "average_tokens_across_devices",
    "eval_on_start",
    "batch_eval_metrics",
    "restore_callback_states_from_checkpoint",
    "label_smoothing_factor",
    "past_index",
    "skip_memory_metrics",
    "accelerator_config",
    "dispatch_batches",
    "split_batches",
    "include_for_metrics",
    "eval_use_gather_object",
    "use_legacy_prediction_loop",
    "jit_mode_eval",
    "half_precision_backend",
    "bf16_full_eval",
    "fp16_full_eval",
    "fp16_opt_level",
    "tpu_num_cores",
    "debug",
    "trackio_space_id",
    "project",
    "hub_revision",
    "parallelism_config",
    "dataloader_in_order",
    "dataloader_multiprocessing_context",
    "ddp_broadcast_buffers",
    "ddp_bucket_cap_mb",
    "ddp_static_graph",
    "enable_jit_checkpoint",
    "eval_do_concat_batches",
    "trackio_bucket_id",
    "trackio_static_space_id",
    "train_sampling_strategy",
    "use_cache",
    "activation_checkpointing_kwargs",
    "liger_kernel_config",
    "_n_gpu",
    "mp_parameters",
    "ray_scope",
    "push_to_hub_model_id",
    "push_to_hub_organization",
    "push_to_hub_token",
    "use_mps_device",
    "torchdynamo",
    "use_ipex",
}


def _training_args(r: _Reading, defaults: dict) -> None:
    """The TrainingArguments fields every HF-Trainer-based tool shares (TRL, LLaMA-Factory, bare transformers).
    `defaults` are the tool's own defaults for them, each (value, source)."""
    k = r.keys
    for key, fld in (("per_device_train_batch_size", "batch"), ("gradient_accumulation_steps", "grad_accum")):
        v = k.get(key, "int")
        if v is not None:
            r.from_key(fld, key, v)
        elif fld in defaults:
            r.default(fld, defaults)
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (both are in its JSON)
    gc_key = "activation_checkpointing" if k.has("activation_checkpointing") else "gradient_checkpointing"
    gc = k.get(gc_key, "bool")
    k.raw("gradient_checkpointing")
    if gc is not None:
        r.from_key("gradient_checkpointing", gc_key, gc)
    elif "gradient_checkpointing" in defaults:
        v, src = defaults["gradient_checkpointing"]
        r.set("gradient_checkpointing", v, f"default: {src}")
    if k.has("optim"):
        _optimizer(r, "optim")
    if "optimizer" not in r.values and "optimizer" in defaults:
        r.default("optimizer", defaults)
    if not _epochs(r, "num_train_epochs") and "epochs" in defaults:
        r.default("epochs", defaults)
    _precision(r, defaults)
    if k.has("attn_implementation"):
        _attention_from_name(r, "attn_implementation", k.get("attn_implementation", "str"))
    if k.get("use_liger_kernel", "bool"):
        r.unmodelled(
            "use_liger_kernel",
            "Liger's fused kernels: the fused linear cross-entropy never holds the "
            "logits, so the plan's logits term is an overestimate",
        )
    _distributed(r)
    if k.has("torch_compile") and k.get("torch_compile", "bool"):
        r.unmodelled("torch_compile", "compiled kernels fuse elementwise passes: less activation memory, faster")
    for key, what in (
        ("optim_target_modules", "GaLore / APOLLO projected optimizer states"),
        (
            "torch_empty_cache_steps",
            "empties the allocator's cache every few steps: the reserved peak can be lower than planned",
        ),
    ):
        if k.raw(key):
            r.not_modelled.append(f"{key} ({what})")
    if k.get("auto_find_batch_size", "bool"):
        r.unmodelled(
            "auto_find_batch_size",
            "the Trainer halves the batch after an out-of-memory error; the plan is for the batch as written",
        )
    r.ignore(*[key for key in TRAINING_ARGS_NO_EFFECT if key in k.data])


def _distributed(r: _Reading) -> None:
    k = r.keys
    for key in ("deepspeed", "fsdp", "fsdp_config"):
        v = k.raw(key)
        if v not in (None, "", [], {}, False):
            r.not_modelled.append(
                f"{key} ({'sharding across GPUs' if key != 'deepspeed' else 'ZeRO sharding / offload'}: "
                "not modelled yet; planned as one process holding the whole model)"
            )


def _lora(r: _Reading, keys: tuple[str, str, str, str], defaults: dict) -> None:
    """rank, alpha, dropout and target modules from their keys in this trainer's words, else its defaults."""
    rank_key, alpha_key, dropout_key, target_key = keys
    k = r.keys
    targets = k.get(target_key, "str-or-list")
    if targets:
        r.from_key("targets", target_key, _targets(targets))
    else:
        r.default("targets", defaults)
    for key, fld, kind in (
        (rank_key, "rank", "int"),
        (alpha_key, "alpha", "number"),
        (dropout_key, "dropout", "number"),
    ):
        v = k.get(key, kind)
        if v is not None:
            r.from_key(fld, key, v)
        elif fld in defaults:
            r.default(fld, defaults)
    if "alpha" not in r.values and "rank" in r.values and defaults.get("alpha_from_rank"):
        r.set("alpha", 2 * r.values["rank"], f"default: {defaults['alpha_from_rank']}")


def _quant_4bit(r: _Reading, type_key: str, dq_key: str, defaults: dict) -> None:
    t = r.keys.get(type_key, "str")
    if t is not None:
        if t.strip().lower() not in ("nf4", "fp4"):
            raise InputError(
                f"{r.where}: key '{type_key}' is {shown(t)}; expected nf4 or fp4 (bitsandbytes' 4-bit types)"
            )
        r.from_key("quant", type_key, t.strip().lower())
    elif "quant" in defaults:
        r.default("quant", defaults)
    dq = r.keys.get(dq_key, "bool")
    if dq is not None:
        r.from_key("double_quant", dq_key, dq)
    elif "double_quant" in defaults:
        r.default("double_quant", defaults)


def _method(r: _Reading, method: str, why: str) -> None:
    r.set("method", method, why)


def read_trl(data: dict, where: str) -> TrainerConfig:
    r = _Reading("trl", data, where)
    k = r.keys
    model = k.get("model_name_or_path", "str")
    peft = k.get("use_peft", "bool", False)
    four, eight = k.get("load_in_4bit", "bool", False), k.get("load_in_8bit", "bool", False)
    if four:
        _method(r, "qlora", "load_in_4bit: true" + (", use_peft: true" if peft else ""))
        if not peft:
            r.not_modelled.append(
                "load_in_4bit without use_peft (a 4-bit model cannot be trained without "
                "adapters: TRL would refuse it; planned as QLoRA)"
            )
    elif peft:
        _method(r, "lora", "use_peft: true")
    else:
        _method(r, "full", "use_peft not set: full fine-tuning")
    if eight:
        r.unmodelled(
            "load_in_8bit",
            "LLM.int8 base weights are not modelled; planned as 16-bit LoRA, about twice the base weights' memory",
        )
    if r.values["method"] != "full":
        _lora(r, ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"), TRL_DEFAULTS)
        _quant_4bit(r, "bnb_4bit_quant_type", "use_bnb_nested_quant", TRL_DEFAULTS)
        if r.values["method"] == "qlora":
            r.default("upcast_non_quantized", TRL_DEFAULTS)
            r.not_modelled.append(
                "QLoRA adapters in bf16 (SFTTrainer casts them; planned in fp32 as peft makes them: adapters, "
                "their gradients and optimizer states are slightly overestimated)"
            )
        for key, what in (
            ("lora_modules_to_save", "full trainable copies of these modules, with gradients and optimizer states"),
            ("use_dora", "DoRA's magnitude vectors and the weight norms it computes each step"),
        ):
            if k.raw(key):
                r.not_modelled.append(f"{key} ({what})")
        r.ignore("lora_task_type", "use_rslora", "lora_bias")
    else:
        r.ignore(
            "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "bnb_4bit_quant_type", "use_bnb_nested_quant"
        )
    length_key = "max_length" if "max_length" in data else "max_seq_length"
    n = k.get(length_key, "int")
    if n is not None:
        r.from_key("seq", length_key, n)
    elif length_key in data:  # written as null: SFTConfig then truncates nothing
        r.default("seq", TRL_DEFAULTS)
        r.missing["seq"] = (
            f"{where}: key '{length_key}' is null (no truncation: sequences are as long as the longest example); "
            "give --seq with that length"
        )
    else:
        r.default("seq", TRL_DEFAULTS)
    for key, what in (
        (
            "packing",
            "packed sequences fill every row to max_length, as planned; attention does not "
            "cross sample boundaries (not modelled)",
        ),
        ("padding_free", "rows without padding: fewer tokens than the planned full max_length"),
    ):
        if k.get(key, "bool"):
            r.not_modelled.append(f"{key} ({what})")
    # TRL >= 1.0 (sft_config.py): loss_type unset means chunked_nll (lm_head on non-ignored tokens, cross-entropy in
    # chunks), except with use_liger_kernel
    loss = k.get("loss_type", "str")
    if (loss or ("nll" if data.get("use_liger_kernel") else "chunked_nll")) == "chunked_nll":
        r.not_modelled.append(
            f"loss_type{'' if loss else ' (unset)'}: chunked_nll (TRL's default: the logits are computed in chunks "
            "of tokens, so the plan's logits term is an overestimate)"
        )
    if k.get("activation_offloading", "bool"):
        r.not_modelled.append("activation_offloading (activations kept in host memory: less GPU memory than planned)")
    dtype_key = "dtype" if k.has("dtype") else "torch_dtype"
    dtype = k.get(dtype_key, "str")
    _training_args(r, TRL_DEFAULTS)
    if dtype and not k.has("bf16") and not k.has("fp16"):
        d = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "bf16"}.get(dtype.strip().lower())
        if d is None:
            raise InputError(
                f"{where}: key '{dtype_key}' is {shown(dtype)}; expected bfloat16, float16, float32 or auto"
            )
        r.from_key("compute_dtype", dtype_key, d)
    r.ignore(*TRL_NO_EFFECT)
    return r.done(model, TRL_NO_EFFECT | TRAINING_ARGS_NO_EFFECT)


def read_llama_factory(data: dict, where: str) -> TrainerConfig:
    r = _Reading("llama-factory", data, where)
    k = r.keys
    model = k.get("model_name_or_path", "str")
    stage = k.get("stage", "str", "sft")
    if stage not in ("sft", "pt"):
        r.not_modelled.append(
            f"stage ({stage}: a second model or extra forward passes for {stage}; planned as supervised fine-tuning)"
        )
    ft = k.get("finetuning_type", "str", LLAMA_FACTORY_DEFAULTS["finetuning_type"][0])
    bits = k.get("quantization_bit", "int")
    qmethod = k.get("quantization_method", "str", "bnb")
    if ft == "full":
        _method(r, "full", "finetuning_type: full")
    elif ft == "lora":
        if bits == 4 and qmethod.lower() == "bnb":
            _method(r, "qlora", "finetuning_type: lora, quantization_bit: 4")
        else:
            why = (
                "finetuning_type: lora"
                if k.has("finetuning_type")
                else f"default: {LLAMA_FACTORY_DEFAULTS['finetuning_type'][1]}"
            )
            _method(r, "lora", why)
            if bits is not None:
                r.not_modelled.append(
                    f"quantization_bit ({bits}-bit {qmethod} base weights are not modelled; planned as 16-bit LoRA)"
                )
    else:
        raise InputError(
            f"{where}: key 'finetuning_type' is {shown(ft)}; qlora-bench plans lora (with "
            "quantization_bit: 4 for QLoRA) and full; freeze and oft are not modelled"
        )
    if r.values["method"] != "full":
        _lora(r, ("lora_rank", "lora_alpha", "lora_dropout", "lora_target"), LLAMA_FACTORY_DEFAULTS)
        if r.values["method"] == "qlora":
            _quant_4bit(r, "quantization_type", "double_quantization", LLAMA_FACTORY_DEFAULTS)
            r.default("upcast_non_quantized", LLAMA_FACTORY_DEFAULTS)
        for key, what in (
            ("additional_target", "full trainable copies of these modules, with gradients and optimizer states"),
            ("use_dora", "DoRA's magnitude vectors and the weight norms it computes each step"),
            ("pissa_init", "PiSSA's SVD at start-up (a one-off peak)"),
        ):
            if k.raw(key):
                r.not_modelled.append(f"{key} ({what})")
        r.ignore("use_rslora", "create_new_adapter", "adapter_name_or_path", "loraplus_lr_ratio")
    if r.values["method"] == "full":  # adapter settings of a run that trains no adapters
        r.ignore(*LORA_KEYS)
    n = k.get("cutoff_len", "int")
    if n is not None:
        r.from_key("seq", "cutoff_len", n)
    else:
        r.default("seq", LLAMA_FACTORY_DEFAULTS)
    fa = k.get("flash_attn", "str")
    if fa is not None:
        attn = {"auto": "sdpa", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}.get(fa.lower())
        if attn is None:
            raise InputError(f"{where}: key 'flash_attn' is {shown(fa)}; expected auto, disabled, sdpa or fa2")
        r.from_key("attn", "flash_attn", attn)
    dgc = k.get("disable_gradient_checkpointing", "bool")
    if dgc is not None:
        r.from_key("gradient_checkpointing", "disable_gradient_checkpointing", not dgc)
    else:
        r.default("gradient_checkpointing", LLAMA_FACTORY_DEFAULTS)
    if k.get("pure_bf16", "bool"):
        r.from_key("compute_dtype", "pure_bf16", "bf16")
    for key, what in (
        ("packing", "packed sequences fill every row to cutoff_len, as planned"),
        ("neat_packing", "packed sequences without cross-attention between samples"),
        (
            "enable_liger_kernel",
            "Liger's fused kernels: the fused linear cross-entropy never holds "
            "the logits, so the plan's logits term is an overestimate",
        ),
        ("use_unsloth", "Unsloth's kernels and offloaded checkpointing use less memory"),
        ("upcast_layernorm", "norms in fp32"),
        ("upcast_lmhead_output", "the lm_head's output in fp32"),
    ):
        if k.get(key, "bool"):
            r.not_modelled.append(f"{key} ({what})")
    _training_args(r, {key: v for key, v in LLAMA_FACTORY_DEFAULTS.items() if key != "gradient_checkpointing"})
    r.ignore(*LLAMA_FACTORY_NO_EFFECT)
    return r.done(model, LLAMA_FACTORY_NO_EFFECT | TRAINING_ARGS_NO_EFFECT)


def read_transformers(data: dict, where: str) -> TrainerConfig:
    """A TrainingArguments JSON: batch, accumulation, checkpointing, optimizer, precision; it names no model,
    sequence length or adapters (those come from the command line)."""
    r = _Reading("transformers", data, where)
    _training_args(r, TRANSFORMERS_DEFAULTS)
    return r.done(None, TRAINING_ARGS_NO_EFFECT)


def read_axolotl(data: dict, where: str) -> TrainerConfig:
    r = _Reading("axolotl", data, where)
    k = r.keys
    model = k.get("base_model", "str")
    if k.has("base_model_config"):
        model = k.get("base_model_config", "str")  # the config to build the model from, where it differs
    adapter = k.get("adapter", "str")
    four, eight = k.get("load_in_4bit", "bool", False), k.get("load_in_8bit", "bool", False)
    if adapter is None:
        _method(r, "full", "no adapter: full fine-tuning")
    elif adapter.lower() == "qlora" or (adapter.lower() == "lora" and four):
        _method(r, "qlora", f"adapter: {adapter}" + (", load_in_4bit: true" if four else ""))
    elif adapter.lower() == "lora":
        _method(r, "lora", "adapter: lora")
        if eight:
            r.unmodelled(
                "load_in_8bit",
                "LLM.int8 base weights are not modelled; planned as 16-bit LoRA, about twice the base weights' memory",
            )
    else:
        raise InputError(
            f"{where}: key 'adapter' is {shown(adapter)}; qlora-bench plans lora and qlora (or no "
            "adapter: full fine-tuning)"
        )
    if r.values["method"] != "full":
        _lora(r, ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"), AXOLOTL_DEFAULTS)
        if k.get("lora_target_linear", "bool"):  # all linear layers, whatever lora_target_modules says
            r.from_key("targets", "lora_target_linear", "all-linear")
        if r.values["method"] == "qlora":
            bnb = k.raw("bnb_config_kwargs") or {}
            if not isinstance(bnb, dict):
                raise InputError(
                    f"{where}: key 'bnb_config_kwargs' is {shown(bnb)}; expected a mapping of "
                    "BitsAndBytesConfig arguments"
                )
            sub = _Keys(bnb, f"{where}: bnb_config_kwargs")
            _quant_4bit(_SubReading(r, sub), "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", AXOLOTL_DEFAULTS)
            for key in sub.rest():  # the storage dtype does not change the packed bytes; the rest is int8's
                known = key in (
                    "bnb_4bit_quant_storage",
                    "bnb_4bit_compute_dtype",
                    "llm_int8_threshold",
                    "llm_int8_has_fp16_weight",
                    "load_in_4bit",
                )
                (r.no_effect if known else r.unknown).append(f"bnb_config_kwargs.{key}")
            r.default("upcast_non_quantized", AXOLOTL_DEFAULTS)
        for key, what in (
            ("lora_modules_to_save", "full trainable copies of these modules, with gradients and optimizer states"),
            ("peft_use_dora", "DoRA's magnitude vectors and the weight norms it computes each step"),
        ):
            if k.raw(key):
                r.not_modelled.append(f"{key} ({what})")
        r.ignore("lora_fan_in_fan_out", "peft_use_rslora", "lora_model_dir")
    if r.values["method"] == "full":  # adapter settings of a run that trains no adapters
        r.ignore(*LORA_KEYS)
    n = k.get("sequence_len", "int")
    if n is not None:
        r.from_key("seq", "sequence_len", n)
    else:
        r.default("seq", AXOLOTL_DEFAULTS)
    mb = k.get("micro_batch_size", "int")
    if mb is not None:
        r.from_key("batch", "micro_batch_size", mb)
    else:
        r.default("batch", AXOLOTL_DEFAULTS)
    ga = k.get("gradient_accumulation_steps", "int")
    total = k.get("batch_size", "int")
    if ga is not None:
        r.from_key("grad_accum", "gradient_accumulation_steps", ga)
    elif total is not None:
        ga = max(total // r.values["batch"], 1)  # axolotl: gradient_accumulation_steps = batch_size // micro_batch_size
        r.set("grad_accum", ga, f"batch_size: {total} / micro_batch_size {r.values['batch']}")
    else:
        r.default("grad_accum", AXOLOTL_DEFAULTS)
    gc = k.get("gradient_checkpointing", "bool-or-str")
    if isinstance(gc, str):
        if gc.lower() not in ("offload", "offload_disk", "true"):
            raise InputError(f"{where}: key 'gradient_checkpointing' is {shown(gc)}; expected true, false or offload")
        r.from_key("gradient_checkpointing", "gradient_checkpointing", True)
        if gc.lower() != "true":
            r.not_modelled.append(
                f"gradient_checkpointing: {gc} (checkpoints offloaded to host memory: less GPU memory than planned)"
            )
    elif gc is not None:
        r.from_key("gradient_checkpointing", "gradient_checkpointing", gc)
    else:
        r.default("gradient_checkpointing", AXOLOTL_DEFAULTS)
    if k.has("optimizer"):
        _optimizer(r, "optimizer")
    if "optimizer" not in r.values:
        r.default("optimizer", AXOLOTL_DEFAULTS)
    _epochs(r, "num_epochs")
    _precision(r, AXOLOTL_DEFAULTS)
    attn = [
        key
        for key in ("flash_attention", "sdp_attention", "xformers_attention", "eager_attention")
        if k.get(key, "bool")
    ]
    if k.has("attn_implementation"):
        _attention_from_name(r, "attn_implementation", k.get("attn_implementation", "str"))
    elif attn:
        name = {
            "flash_attention": "flash_attention_2",
            "sdp_attention": "sdpa",
            "eager_attention": "eager",
            "xformers_attention": "xformers",
        }[attn[0]]
        _attention_from_name(r, attn[0], name)
    else:
        r.default("attn", AXOLOTL_DEFAULTS)
    for key, what in (
        (
            "sample_packing",
            "packed sequences fill every row to sequence_len, as planned; attention does not cross sample boundaries",
        ),
        (
            "liger_fused_linear_cross_entropy",
            "the fused linear cross-entropy never holds the logits: the plan's logits term is an overestimate",
        ),
        ("cut_cross_entropy", "Cut Cross-Entropy never holds the logits: the plan's logits term is an overestimate"),
        ("liger_rms_norm", "Liger's fused RMSNorm saves less for backward"),
        ("liger_glu_activation", "Liger's fused SwiGLU saves less for backward"),
        ("liger_rope", "Liger's fused rotary embedding"),
        ("unsloth_lora_mlp", "Unsloth's fused LoRA kernels"),
        ("unsloth_lora_qkv", "Unsloth's fused LoRA kernels"),
        ("unsloth_lora_o", "Unsloth's fused LoRA kernels"),
        ("torch_compile", "compiled kernels fuse elementwise passes"),
    ):
        if k.has(key) and k.raw(key):
            r.not_modelled.append(f"{key} ({what})")
    _distributed(r)
    r.ignore(*AXOLOTL_NO_EFFECT)
    return r.done(model, AXOLOTL_NO_EFFECT)


class _SubReading(_Reading):
    """A reading of a nested mapping (bnb_config_kwargs) whose values land in the parent reading."""

    def __init__(self, parent: _Reading, keys: _Keys):
        self.__dict__.update(parent.__dict__)
        self.keys = keys


# the adapter keys of the three trainers: no effect in a run without adapters
LORA_KEYS = (
    "lora_r",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "lora_target_modules",
    "lora_target_linear",
    "lora_modules_to_save",
    "additional_target",
    "use_dora",
    "peft_use_dora",
    "use_rslora",
    "peft_use_rslora",
    "quantization_type",
    "double_quantization",
    "bnb_config_kwargs",
    "lora_model_dir",
)


# ---- which trainer ---------------------------------------------------------------------------------------------
# Keys only one trainer's config uses (its documented examples all carry some of them).
SIGNATURES = {
    "axolotl": {
        "base_model",
        "adapter",
        "sequence_len",
        "micro_batch_size",
        "lora_target_linear",
        "datasets",
        "num_epochs",
        "sample_packing",
        "flash_attention",
        "load_in_4bit",
        "dataset_prepared_path",
        "val_set_size",
        "special_tokens",
        "base_model_config",
    },
    "llama-factory": {
        "stage",
        "finetuning_type",
        "cutoff_len",
        "lora_rank",
        "lora_target",
        "quantization_bit",
        "template",
        "dataset",
        "flash_attn",
        "plot_loss",
        "overwrite_cache",
        "max_samples",
    },
    "trl": {
        "model_name_or_path",
        "use_peft",
        "max_length",
        "max_seq_length",
        "dataset_name",
        "packing",
        "lora_target_modules",
        "load_in_4bit",
        "use_bnb_nested_quant",
        "dataset_text_field",
        "completion_only_loss",
        "assistant_only_loss",
    },
    "transformers": {"per_device_train_batch_size", "output_dir", "optim", "logging_steps", "_n_gpu"},
}
READERS = {
    "axolotl": read_axolotl,
    "trl": read_trl,
    "llama-factory": read_llama_factory,
    "transformers": read_transformers,
}


def detect(data: dict, where: str) -> str:
    """The trainer a config is for, from the keys only it uses: LLaMA-Factory's and Axolotl's own vocabularies
    first (their files also carry TrainingArguments names), then TRL (TrainingArguments plus a model and
    sequence length), then bare TrainingArguments."""
    keys = set(data)
    score = {tool: len(keys & sig) for tool, sig in SIGNATURES.items()}
    if score["llama-factory"] >= 2 or {"finetuning_type", "cutoff_len"} & keys:
        return "llama-factory"
    if score["axolotl"] >= 2 or {"base_model", "sequence_len", "micro_batch_size"} & keys:
        return "axolotl"
    if "model_name_or_path" in keys or score["trl"] >= 2:
        return "trl"
    if score["transformers"] >= 1:
        return "transformers"
    raise InputError(
        f"{where}: not a trainer config qlora-bench knows (Axolotl: base_model, sequence_len, micro_batch_size; "
        "TRL: model_name_or_path, max_length, per_device_train_batch_size; LLaMA-Factory: finetuning_type, "
        "cutoff_len; TrainingArguments JSON: per_device_train_batch_size, output_dir)"
    )


def read(path: str | Path) -> TrainerConfig:
    """A trainer config file, detected and read into Settings' words."""
    where = str(path)
    data = load_file(path)
    tool = detect(data, where)
    return READERS[tool](data, where)


# ---- each trainer's defaults (value, where it comes from) --------------------------------------------------------
# transformers 5.x TrainingArguments (training_args.py): per_device_train_batch_size=8, gradient_accumulation_steps=1,
# gradient_checkpointing off, optim=adamw_torch_fused (default_optim on torch >= 2.8), num_train_epochs=3.0, bf16
# and fp16 off: the model trains in the dtype it was loaded in (transformers 5 loads a checkpoint's own dtype,
# bf16 for the profiled models).
TRANSFORMERS_DEFAULTS = {
    "batch": (8, "TrainingArguments.per_device_train_batch_size = 8"),
    "grad_accum": (1, "TrainingArguments.gradient_accumulation_steps = 1"),
    "gradient_checkpointing": (False, "TrainingArguments: gradient checkpointing off"),
    "optimizer": ("adamw_torch_fused", "TrainingArguments.optim = adamw_torch_fused"),
    "epochs": (3.0, "TrainingArguments.num_train_epochs = 3"),
    "compute_dtype": (
        "bf16",
        "no autocast; the weights stay in the checkpoint's dtype, bf16 (transformers 5 loads dtype='auto')",
    ),
}

# Keys of each trainer that change neither memory nor speed of a training step: data, prompts, logging, saving,
# evaluation, schedules, hub and tracking settings (and TrainingArguments' own, for the HF-Trainer-based ones).
TRL_NO_EFFECT = {
    "dataset_name",
    "dataset_config",
    "dataset_train_split",
    "dataset_test_split",
    "dataset_streaming",
    "dataset_text_field",
    "dataset_kwargs",
    "dataset_num_proc",
    "eos_token",
    "pad_token",
    "chat_template_path",
    "completion_only_loss",
    "assistant_only_loss",
    "model_init_kwargs",
    "model_revision",
    "trust_remote_code",
    "lora_task_type",
    "use_rslora",
    "ignore_bias_buffers",
    "datasets",
    "loss_type",
    "activation_offloading",
    "shuffle_dataset",
    "pad_to_multiple_of",
    "eval_packing",
    "packing_strategy",
    "config",
    "use_cpu",
    "chat_template",
} | TRAINING_ARGS_NO_EFFECT
LLAMA_FACTORY_NO_EFFECT = {
    "trust_remote_code",
    "do_train",
    "dataset",
    "eval_dataset",
    "dataset_dir",
    "template",
    "max_samples",
    "overwrite_cache",
    "preprocessing_num_workers",
    "dataloader_num_workers",
    "plot_loss",
    "val_size",
    "per_device_eval_batch_size",
    "eval_strategy",
    "eval_steps",
    "save_only_model",
    "report_to",
    "run_name",
    "adapter_name_or_path",
    "export_dir",
    "export_size",
    "export_device",
    "export_legacy_format",
    "infer_backend",
    "default_system",
    "enable_thinking",
    "tokenized_path",
    "streaming",
    "buffer_size",
    "mix_strategy",
    "interleave_probs",
    "train_on_prompt",
    "mask_history",
    "image_max_pixels",
    "video_max_pixels",
    "new_special_tokens",
    "resize_vocab",
    "split_special_tokens",
    "use_fast_tokenizer",
    "cache_dir",
    "model_revision",
    "hf_hub_token",
    "ms_hub_token",
    "om_hub_token",
    "include_num_input_tokens_seen",
    "resume_from_checkpoint",
    "use_swanlab",
    "swanlab_project",
    "ddp_timeout",
    "freeze_trainable_layers",
    "freeze_trainable_modules",
    "lora_dropout",
    "use_rslora",
    "create_new_adapter",
    "loraplus_lr_ratio",
} | TRAINING_ARGS_NO_EFFECT
AXOLOTL_NO_EFFECT = {
    "model_type",
    "tokenizer_type",
    "tokenizer_config",
    "trust_remote_code",
    "is_llama_derived_model",
    "datasets",
    "test_datasets",
    "dataset_prepared_path",
    "val_set_size",
    "output_dir",
    "hub_model_id",
    "hub_strategy",
    "wandb_project",
    "wandb_entity",
    "wandb_watch",
    "wandb_name",
    "wandb_run_id",
    "wandb_log_model",
    "mlflow_tracking_uri",
    "mlflow_experiment_name",
    "use_tensorboard",
    "lr_scheduler",
    "learning_rate",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "logging_steps",
    "evals_per_epoch",
    "eval_steps",
    "saves_per_epoch",
    "save_steps",
    "save_total_limit",
    "save_strategy",
    "eval_strategy",
    "special_tokens",
    "tokens",
    "chat_template",
    "train_on_inputs",
    "group_by_length",
    "early_stopping_patience",
    "resume_from_checkpoint",
    "local_rank",
    "debug",
    "seed",
    "strict",
    "tf32",
    "pad_to_sequence_len",
    "eval_sample_packing",
    "eval_max_new_tokens",
    "eval_table_size",
    "auto_resume_from_checkpoints",
    "max_steps",
    "lr_quadratic_warmup",
    "cosine_min_lr_ratio",
    "xformers_attention",
    "flash_attn_cross_entropy",
    "flash_attn_rms_norm",
    "flash_attn_fuse_qkv",
    "flash_attn_fuse_mlp",
    "hf_use_auth_token",
    "shuffle_merged_datasets",
    "dataset_processes",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_prefetch_factor",
    "lora_model_dir",
    "lora_fan_in_fan_out",
    "peft_use_rslora",
    "bf16",
    "fp16",
    "plugins",
    "gptq",
    "load_in_8bit",
    "load_in_4bit",
    "micro_batch_size",
    "num_epochs",
    "sequence_len",
    "default_system_message",
    "remove_unused_columns",
    "ddp_timeout",
    "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers",
    "torch_compile_backend",
    "loss_watchdog_threshold",
    "loss_watchdog_patience",
    "save_safetensors",
    "save_first_step",
    "neftune_noise_alpha",
    "chat_template_jinja",
    "sample_packing_eff_est",
    "total_num_tokens",
}

# TRL (trl/trainer/sft_config.py SFTConfig and trl/trainer/model_config.py ModelConfig, 0.2x): SFTConfig turns
# gradient checkpointing on and bf16 on (unless fp16) and cuts sequences at max_length=1024; ModelConfig's LoRA
# defaults r=16, alpha=32, dropout=0.05, no target modules (peft then takes its per-architecture default, q_proj
# and v_proj for the Llama-like families), nf4 without nested (double) quantization. TrainingArguments' own
# defaults for the rest. SFTTrainer (trl/trainer/sft_trainer.py, __init__) calls get_peft_model without peft's
# prepare_model_for_kbit_training, and casts a quantized model's trainable (adapter) parameters to bf16.
TRL_DEFAULTS = {
    **TRANSFORMERS_DEFAULTS,
    "gradient_checkpointing": (True, "SFTConfig.gradient_checkpointing = True"),
    "compute_dtype": ("bf16", "SFTConfig.bf16 defaults to on unless fp16 is"),
    "seq": (1024, "SFTConfig.max_length = 1024"),
    "rank": (16, "ModelConfig.lora_r = 16"),
    "alpha": (32, "ModelConfig.lora_alpha = 32"),
    "dropout": (0.05, "ModelConfig.lora_dropout = 0.05"),
    "targets": ("q_proj,v_proj", "lora_target_modules unset, peft's default for Llama-like models"),
    "quant": ("nf4", "ModelConfig.bnb_4bit_quant_type = nf4"),
    "double_quant": (False, "ModelConfig.use_bnb_nested_quant = False"),
    "upcast_non_quantized": (
        False,
        "SFTTrainer wraps the 4-bit model with get_peft_model only (no "
        "prepare_model_for_kbit_training): embeddings, norms and lm_head stay 16-bit",
    ),
}

# LLaMA-Factory (src/llamafactory/hparams/): finetuning_type=lora, lora_rank=8, lora_alpha=None (2 x rank),
# lora_dropout=0, lora_target=all, cutoff_len=2048, quantization_type=nf4, double_quantization=True, gradient
# checkpointing on (disable_gradient_checkpointing=False), flash_attn=auto (transformers' default, sdpa). For 4-bit
# it does not call peft's prepare_model_for_kbit_training (model_utils/checkpointing.py upcasts norms only with
# upcast_layernorm), so embeddings, norms and lm_head stay 16-bit.
LLAMA_FACTORY_DEFAULTS = {
    **TRANSFORMERS_DEFAULTS,
    "finetuning_type": ("lora", "FinetuningArguments.finetuning_type = lora"),
    "rank": (8, "FinetuningArguments.lora_rank = 8"),
    "alpha_from_rank": "FinetuningArguments.lora_alpha = None: 2 x lora_rank",
    "dropout": (0.0, "FinetuningArguments.lora_dropout = 0"),
    "targets": ("all-linear", "FinetuningArguments.lora_target = all"),
    "seq": (2048, "DataArguments.cutoff_len = 2048"),
    "quant": ("nf4", "ModelArguments.quantization_type = nf4"),
    "double_quant": (True, "ModelArguments.double_quantization = True"),
    "gradient_checkpointing": (True, "disable_gradient_checkpointing = False"),
    "upcast_non_quantized": (False, "LLaMA-Factory does not call peft's prepare_model_for_kbit_training"),
}

# Axolotl (read at commit 067b021, Jul 2026: utils/schemas/config.py sequence_len=512, gradient checkpointing off,
# bf16="auto"; schemas/training.py micro_batch_size=1, gradient_accumulation_steps=1, optimizer adamw_torch_fused;
# schemas/peft.py lora_dropout=0.0; loaders/model.py sets attn_implementation only when the file names one, so
# transformers' default (sdpa) applies otherwise).
# For QLoRA it builds BitsAndBytesConfig(nf4, double quantization) and calls peft's prepare_model_for_kbit_training,
# then (src/axolotl/loaders/model.py, ModelLoader._configure_embedding_dtypes: `needs_fa2_dtype = True` for any adapter,
# without FSDP) converts the norms and the embedding modules (embed_tokens, lm_head) back to cfg.torch_dtype: they
# train 16-bit, unlike peft's fp32 upcast.
AXOLOTL_DEFAULTS = {
    "seq": (512, "sequence_len = 512"),
    "batch": (1, "micro_batch_size = 1"),
    "grad_accum": (1, "gradient_accumulation_steps = 1"),
    "gradient_checkpointing": (False, "gradient_checkpointing off"),
    "optimizer": ("adamw_torch_fused", "optimizer = adamw_torch_fused"),
    "dropout": (0.0, "lora_dropout = 0"),
    "targets": ("q_proj,v_proj", "lora_target_modules unset, peft's default for Llama-like models"),
    "attn": ("sdpa", "no attention key set, transformers' default (sdpa)"),
    "compute_dtype": ("bf16", "bf16 = auto (AxolotlInputConfig): bf16 where the GPU has it"),
    "quant": ("nf4", "bnb_4bit_quant_type = nf4"),
    "double_quant": (True, "bnb_4bit_use_double_quant = True"),
    "upcast_non_quantized": (
        False,
        "Axolotl casts norms and embeddings back to the compute dtype after peft's upcast, for adapters",
    ),
}
