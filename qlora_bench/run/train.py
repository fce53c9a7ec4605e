"""One configuration, measured: build, wrap, warm up, time steps, record memory and throughput.

The loop is the one the HF Trainer runs per optimizer step: forward under autocast keeping only `.loss` (the
logits are freed before backward), backward, optimizer step, `zero_grad(set_to_none=True)`. Memory peaks are
reset after load, so `peak_*` cover training only; NVML is sampled in a thread. Timing is honest about noise:
every step time is kept, the timed phase lasts at least `steps` steps and `min_seconds`, and tokens/s is the
median with its spread (small steps on an H100 were seen to vary by up to 30% between repeats).
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Literal

from ..errors import read_text
from ..profiles import ModelSpec
from ..results import SCHEMA_VERSION
from ..schema import rule
from ..settings import Settings
from . import probes
from .materialize import add_adapters, build_model, build_optimizer, prepare_base, torch_dtype
from .progress import Say, silent
from .quiet import quiet_libraries

LOOP = (
    "autocast(compute dtype): loss = model(input_ids=x, labels=x).loss; loss.backward() per micro-batch; "
    "optimizer.step(); optimizer.zero_grad(set_to_none=True)"
)
SFT = (
    "trl SFTTrainer(model, SFTConfig(optim, bf16/fp16, per_device_train_batch_size, gradient_accumulation_steps, "
    "max_steps)) on pre-tokenized random ids with attention_mask; labels = input_ids"
)
TRAINERS = ("loop", "sft")


@dataclass(frozen=True)
class RunOptions:
    """How one configuration is measured (the `options:` of a sweep file; run's flags)."""

    steps: int = rule(5, ge=1, le=10**6, hint="timed optimizer steps, at least")
    warmup: int = rule(3, ge=0, le=10**6, hint="untimed warm-up steps")
    seed: int = rule(0, ge=0, le=2**63 - 1)
    min_seconds: float = rule(0.0, ge=0, le=1e6, hint="keep timing until this much time has passed too")
    max_steps: int = rule(200, ge=1, le=10**6, hint="cap for the min_seconds rule")
    trainer: Literal[TRAINERS] = "loop"  # loop: the plain Trainer-equivalent loop; sft: trl's SFTTrainer itself
    text: str | None = rule(None, max_len=4096)  # a text file to train on instead of random token ids
    tokenizer: str | None = rule(None, max_len=4096)  # a local tokenizer folder for `text`


def finite_or_none(x: float) -> float | None:
    """A diverged step's loss (NaN, inf: fp16 overflow) is recorded as null: JSON has no NaN, and the record
    (memory, time) is still a measurement."""
    return x if math.isfinite(x) else None


def _param_bytes_by_dtype(model) -> dict:
    out: dict[str, int] = {}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = str(p.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return dict(sorted(out.items()))


def _optimizer_state_bytes(opt) -> tuple[int, int]:
    """Bytes of optimizer state tensors (shared qmaps once), and the part allocated as paged managed memory."""
    import torch

    total = paged = 0
    seen = set()
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                n = v.numel() * v.element_size()
                total += n
                if getattr(v, "is_paged", False):
                    paged += n
    return total, paged


def _inject_fault(config_id: str, where: str) -> None:
    """Test hook: QLORA_BENCH_FAULT='oom|error|segfault[@substring]' makes matching configurations fail."""
    spec = os.environ.get("QLORA_BENCH_FAULT", "")
    if not spec:
        return
    kind, _, match = spec.partition("@")
    if match and match not in config_id:
        return
    import torch

    if kind == "oom" and where == "step":
        raise torch.OutOfMemoryError("injected OOM (QLORA_BENCH_FAULT)")
    if kind == "error" and where == "step":
        raise RuntimeError("injected error (QLORA_BENCH_FAULT)")
    if kind == "segfault" and where == "step":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang" and where == "step":
        time.sleep(3600)


def _start_training_measurement(nvml, m: dict) -> None:
    """After load: snapshot, then reset peaks so that peak_* cover training only, and start NVML sampling."""
    import torch

    m["mem_after_load"] = probes.memory_snapshot(nvml)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if nvml:
        nvml.start()


def _step_text(step: int, opts: RunOptions, step_seconds: list[float]) -> str:
    """What the loop is about to do: 'warm-up step 2/3', 'timed step 4/5 (last 1.23 s)'."""
    last = f" (last {step_seconds[-1]:.2f} s)" if step_seconds else ""
    if step < opts.warmup:
        return f"warm-up step {step + 1}/{opts.warmup}{last}"
    timed = step - opts.warmup
    of = f"/{opts.steps}" if timed < opts.steps else f" (timing at least {opts.min_seconds:g} s)"
    return f"timed step {timed + 1}{of}{last}"


def _no_mark(phase: str) -> None:
    pass


def train_step(model, opt, x, s: Settings, device, mark=_no_mark):
    """One optimizer step (LOOP): grad_accum micro-batches of forward under autocast + backward, then the optimizer
    step and zero_grad. Returns the summed loss as a tensor. `mark(phase)` hears "fwd", "bwd", "opt" and "zero" as
    each part starts (qlora_bench.trace records the step's allocations by phase)."""
    import torch

    autocast = s.compute_dtype != "fp32"
    loss_sum = 0.0
    for _ in range(s.grad_accum):
        mark("fwd")
        with torch.autocast(device.type, dtype=torch_dtype(s.compute_dtype), enabled=autocast):
            loss = model(input_ids=x, labels=x).loss / s.grad_accum
        mark("bwd")
        loss.backward()
        loss_sum += loss.detach()
    mark("opt")
    opt.step()
    mark("zero")
    opt.zero_grad(set_to_none=True)
    return loss_sum


def _train_loop(model, opt, x, s: Settings, opts: RunOptions, device, nvml, m: dict, config_id: str, say: Say):
    import torch

    _start_training_measurement(nvml, m)
    step_seconds, losses = [], []
    t_timed = None
    step = 0
    while True:
        if step == opts.warmup:
            t_timed = time.perf_counter()
        timed = step - opts.warmup
        if timed >= opts.steps and (time.perf_counter() - t_timed >= opts.min_seconds or timed >= opts.max_steps):
            break
        say(_step_text(step, opts, step_seconds))
        _inject_fault(config_id, "step")
        t0 = time.perf_counter()
        loss_sum = train_step(model, opt, x, s, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds.append(round(time.perf_counter() - t0, 6))
        losses.append(finite_or_none(round(float(loss_sum), 5)))
        step += 1
    return step_seconds, losses


def _word_level_tokenizer(vocab_size: int):
    """SFTTrainer wants a processing class; the data is already token ids, so any tokenizer over the model's
    vocabulary will do: a WordLevel one built locally (no hub)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({str(i): i for i in range(vocab_size)}, unk_token="0"))  # noqa: S106
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="0", eos_token="1", unk_token="0")  # noqa: S106


def token_rows(spec: ModelSpec, s: Settings, opts: RunOptions, rows: int, g) -> tuple:
    """`rows` sequences of `s.seq` token ids: random (fixed seed), or the user's text file tokenized with a local
    tokenizer, cut into windows (repeated when the text is shorter). Returns (tensor, note or None)."""
    import torch

    if not opts.text:
        return torch.randint(0, spec.vocab_size, (rows, s.seq), generator=g), None

    from transformers import AutoTokenizer

    if not opts.tokenizer:
        raise ValueError("--text needs --tokenizer: a local tokenizer folder (no hub access is assumed)")
    tok = AutoTokenizer.from_pretrained(opts.tokenizer)
    ids = tok(read_text(opts.text, "text file"), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{opts.text}: no tokens")
    if max(ids) >= spec.vocab_size:
        raise ValueError(f"tokenizer ids go up to {max(ids)} but the model's vocabulary has {spec.vocab_size}")
    need = rows * s.seq
    note = None
    if len(ids) < need:
        note = f"text has {len(ids)} tokens, repeated to fill {need}"
        ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids[:need]).view(rows, s.seq), note


def _train_sft(model, spec: ModelSpec, s: Settings, opts: RunOptions, g, nvml, m: dict, config_id: str, say: Say):
    """The same configuration through trl's SFTTrainer: what people actually run. The number of steps is fixed
    (warm-up + steps; min_seconds does not apply); step times come from a callback with device sync."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    total = opts.warmup + opts.steps
    ids, _ = token_rows(spec, s, opts, s.batch * s.grad_accum * total, g)
    data = Dataset.from_dict({"input_ids": ids.tolist()})

    def collate(features):
        x = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}

    times, t0 = [], [0.0]

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            _start_training_measurement(nvml, m)

        def on_step_begin(self, args, state, control, **kw):
            say(_step_text(len(times), opts, times))
            _inject_fault(config_id, "step")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(round(time.perf_counter() - t0[0], 6))

    cuda = torch.cuda.is_available()
    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="qlora-bench-sft-"),
        per_device_train_batch_size=s.batch,
        gradient_accumulation_steps=s.grad_accum,
        max_steps=total,
        optim=s.optimizer,
        learning_rate=1e-4,
        bf16=s.compute_dtype == "bf16",
        fp16=s.compute_dtype == "fp16",
        logging_steps=1,
        report_to=[],
        max_length=s.seq,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        gradient_checkpointing=False,  # already set up by prepare_base
        save_strategy="no",
        use_cpu=not cuda,
        dataloader_num_workers=0,
        seed=opts.seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=data,
        data_collator=collate,
        processing_class=_word_level_tokenizer(spec.vocab_size),
        callbacks=[Timer()],
    )
    trainer.train()
    losses = [finite_or_none(round(h["loss"], 5)) for h in trainer.state.log_history if "loss" in h]
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return times, losses, opt


def run_config(
    spec: ModelSpec, s: Settings, opts: RunOptions, config_id: str = "", nvml=None, progress: Say | None = None
) -> dict:
    """Train `spec` with settings `s` and return a result record (outcome ok / oom / error). `progress(text)`
    hears the phases (qlora_bench.run.progress); library deprecation chatter is kept quiet (quiet.py)."""
    with quiet_libraries():
        return _run_config(spec, s, opts, config_id, nvml, progress or silent)


def _allocator_settings(s: Settings) -> Settings:
    """The caching allocator runs with the settings' alloc_conf; without one, with whatever PYTORCH_CUDA_ALLOC_CONF
    this process has, which the record then says (plan models it: estimate/allocator.py)."""
    import torch

    conf = s.alloc_conf or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if s.alloc_conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = s.alloc_conf  # read when the allocator first runs
        setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
        if torch.cuda.is_available() and setter:  # already running in this process: torch can switch most keys
            setter(s.alloc_conf)
    return s.with_(alloc_conf=conf).validated() if conf != s.alloc_conf else s


def _run_config(spec: ModelSpec, s: Settings, opts: RunOptions, config_id: str, nvml, say: Say) -> dict:
    import torch

    s = _allocator_settings(s.validated())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    nvml = nvml if nvml is not None else (probes.try_nvml() if cuda else None)
    baseline = nvml.used_now() if nvml else None  # before this process allocates anything on the GPU
    m: dict = {"nvml_used_baseline_bytes": baseline}
    record = {
        "schema": SCHEMA_VERSION,
        "kind": "train",
        "id": config_id,
        "model": spec.name,
        "architecture": spec.config,
        "settings": s.to_dict(),
        "run": {
            **asdict(opts),
            "loop": LOOP,
            "loader": "meta + layer-by-layer materialization (qlora_bench.run.materialize)",
        },
        "outcome": "error",
        "error": None,
        "measured": m,
        "environment": None,
        "notes": [] if cuda else ["no CUDA device: a CPU smoke run, no GPU memory figures were taken"],
    }
    torch.manual_seed(opts.seed)
    model = opt = None
    try:
        if opts.trainer not in TRAINERS:
            raise ValueError(f"trainer {opts.trainer!r}: use one of {', '.join(TRAINERS)}")
        if cuda:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        m["mem_after_cuda_init"] = probes.memory_snapshot(nvml)
        say(f"building {spec.name} on {device.type}")
        model = build_model(spec, s, device, progress=say)
        m["mem_after_model_build"] = probes.memory_snapshot(nvml)
        m["param_bytes_by_dtype_after_build"] = _param_bytes_by_dtype(model)
        m["base_model_params"] = spec.total_params
        if s.method == "qlora" and s.upcast_non_quantized:
            say("peft prepare_model_for_kbit_training (fp32 upcast of embeddings, lm_head, norms)")
        model = prepare_base(model, s)
        if s.method == "qlora":
            m["mem_after_prepare_kbit"] = probes.memory_snapshot(nvml)
        if s.uses_adapters:
            say(f"wrapping with peft LoRA (r={s.rank}, {s.targets})")
        model = add_adapters(model, spec, s)
        m["param_bytes_by_dtype_after_wrap"] = _param_bytes_by_dtype(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        m["trainable_params"] = sum(p.numel() for p in trainable)
        m["trainable_param_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
        m["total_params"] = spec.total_params + (m["trainable_params"] if s.uses_adapters else 0)
        g = torch.Generator().manual_seed(opts.seed)
        if opts.trainer == "sft":
            record["run"]["loop"] = SFT
            say("setting up trl SFTTrainer")
            step_seconds, losses, opt = _train_sft(model, spec, s, opts, g, nvml, m, config_id, say)
        else:
            say(f"building optimizer {s.optimizer}")
            opt = build_optimizer(model, s)
            x, note = token_rows(spec, s, opts, s.batch, g)
            x = x.to(device)
            if note:
                record["notes"].append(note)
            step_seconds, losses = _train_loop(model, opt, x, s, opts, device, nvml, m, config_id, say)
        m["optimizer_class"] = f"{type(opt).__module__}.{type(opt).__name__}"
        m["mem_after_train"] = probes.memory_snapshot(nvml)
        timed_s = step_seconds[opts.warmup :]
        med = statistics.median(timed_s)
        tokens = s.batch * s.seq * s.grad_accum
        m.update(
            step_seconds=step_seconds,
            warmup_steps=opts.warmup,
            timed_steps=len(timed_s),
            step_seconds_median=med,
            tokens_per_sec=round(tokens / med, 2),
            tokens_per_sec_min=round(tokens / max(timed_s), 2),
            tokens_per_sec_max=round(tokens / min(timed_s), 2),
            losses=losses,
        )
        record["outcome"] = "ok"
    except torch.OutOfMemoryError as e:
        record.update(outcome="oom", error=str(e).splitlines()[0][:500])
    except Exception as e:  # recorded, never raised: a sweep goes on
        record.update(
            outcome="error", error=f"{type(e).__name__}: {str(e)[:500]}", traceback=traceback.format_exc()[-4000:]
        )
    finally:
        if opt is not None:
            m["optimizer_state_bytes"], m["optimizer_state_paged_bytes"] = _optimizer_state_bytes(opt)
        probes.finish_peaks(m, nvml, baseline)
        record["environment"] = probes.environment(nvml)
    return record
