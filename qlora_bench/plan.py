"""Feasibility plan (pure): verdict, headroom, the largest batch / sequence that fit, and changes that would fit.

What counts against the GPU is the estimator's device peak (what nvidia-smi would show for the process)
without the paged optimizer states, which bitsandbytes allocates as CUDA managed memory that the driver can
evict to host memory under pressure (slower, but not an OOM), plus a safety margin: the largest fraction by which
the estimator under-predicted a measured device peak of that method when that record was held out of the fit
(calibration.json), so that "fits" can be trusted. The usable memory is the board's total minus what the driver
itself uses on an idle GPU.

The verdict, the peaks, the breakdown, the largest batch / sequence and every suggestion that fits (or nearly)
come from a replay of the step through the caching-allocator model. Searches first step with the slack of a
replayed neighbour (`estimate(..., anchor=)`, milliseconds), then replay what they report; suggestions that are
far from fitting print that quicker figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError, shown
from .estimate import Estimate, allocator_config, estimate, step_program
from .estimate.allocator import replay
from .estimate.overhead import overheads
from .profiles import GpuSpec, ModelSpec, gpu_names, resolve_gpu
from .settings import Settings

MAX_BATCH_SEARCH = 1 << 16
MAX_SEQ_SEARCH = 1 << 20


@dataclass
class Suggestion:
    change: str  # what to do, as a person says it
    flags: str  # the command-line flags that do it
    settings: Settings
    peak_device_bytes: int
    fits: bool
    decides_verdict: bool = False
    tight: bool = False  # fits, but the top of the estimate's band does not

    @property
    def verdict(self) -> str:
        return "does not fit" if not self.fits else ("tight" if self.tight else "fits")


@dataclass
class Plan:
    estimate: Estimate
    gpu: GpuSpec
    usable_bytes: int
    fits: bool
    verdict: str  # fits | tight | does not fit
    headroom_bytes: int
    max_batch: int
    max_seq: int
    safety_margin: float = 0.0
    tokens_per_sec: float | None = None  # predicted (None: GPU peak unknown, or no throughput calibration)
    step_seconds: float | None = None
    mfu: float | None = None
    hfu: float | None = None  # + gradient checkpointing's recompute (throughput.py: the FLOPs convention)
    step_time_band: float | None = None  # the worst leave-one-out step-time error of the constants used
    step_time_constants: str | None = None  # the GPU profile whose measurements they were fitted on
    epoch_tokens: int = 100_000_000
    epoch_seconds: float | None = None
    epochs: float = 1.0
    price_per_hour: float | None = None  # per GPU (profile or --price)
    price_source: str | None = None
    cost_usd: float | None = None  # all GPUs, all epochs
    gpu_busy: float | None = None  # fraction of the predicted step the GPU computes (the rest: host-bound)
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_tokens_per_sec(self) -> float | None:
        """All GPUs together (data-parallel copies at the stated scaling)."""
        if not self.tokens_per_sec:
            return None
        return self.tokens_per_sec * self.gpu.count * data_parallel_efficiency(self.gpu.count)

    def to_dict(self) -> dict:
        e = self.estimate
        return {
            **e.to_dict(),
            "gpu": self.gpu.label,
            "gpu_count": self.gpu.count,
            "gpu_memory_bytes": self.gpu.memory_total_bytes,
            "usable_bytes": self.usable_bytes,
            "fits": self.fits,
            "verdict": self.verdict,
            "headroom_bytes": self.headroom_bytes,
            "safety_margin": self.safety_margin,
            "tokens_per_sec": self.tokens_per_sec,
            "step_seconds": self.step_seconds,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "gpu_busy": self.gpu_busy,
            "step_time_band": self.step_time_band,
            "step_time_constants": self.step_time_constants,
            "epoch_tokens": self.epoch_tokens,
            "epoch_seconds": self.epoch_seconds,
            "epochs": self.epochs,
            "price_per_hour": self.price_per_hour,
            "price_source": self.price_source,
            "cost_usd": self.cost_usd,
            "required_bytes": self.usable_bytes - self.headroom_bytes,
            "max_batch": self.max_batch,
            "max_seq": self.max_seq,
            "suggestions": [
                {
                    "change": s.change,
                    "flags": s.flags,
                    "peak_device_bytes": s.peak_device_bytes,
                    "fits": s.fits,
                    "verdict": s.verdict,
                    "decides_verdict": s.decides_verdict,
                }
                for s in self.suggestions
            ],
            "notes": e.notes + self.notes,
        }


def usable_bytes(gpu: GpuSpec) -> int:
    return gpu.memory_total_bytes - overheads().driver_idle


def retry_replay(model: ModelSpec, s: Settings, e: Estimate, usable: int):
    """The step replayed against the GPU's capacity, for a step whose cache does not fit but whose tensors might:
    when cudaMalloc fails, torch's allocator frees its cached blocks and retries before it raises
    (CUDACachingAllocator.cpp, malloc's OOM path, modelled in allocator.py). The allocator may use what is usable,
    less the safety margin and what is not its own (CUDA context, libraries). The Replay when the step completes
    within that, else None."""
    capacity = int(usable / (1 + e.overheads.margin(s.method))) - (e.resident_device_bytes - e.peak_reserved_bytes)
    if e.peak_allocated_bytes > capacity:
        return None
    r = replay(step_program(model, s, workspace=e.overheads.cublas_workspace), allocator_config(s), capacity)
    return None if r.oom else r


def required_bytes(e: Estimate) -> int:
    """What must be free on the GPU: resident device peak plus the method's calibrated safety margin."""
    return round(e.resident_device_bytes * (1 + e.overheads.margin(e.settings.method)))


def _tight(e: Estimate, usable: int) -> bool:
    """The top of the estimate's band (without the paged states) does not fit."""
    return e.device_high_bytes - e.paged_bytes > usable


def fits_with_margin(e: Estimate, usable: int) -> bool:
    return required_bytes(e) <= usable


_fits = fits_with_margin


def fits(model: ModelSpec, s: Settings, usable: int, anchor: Estimate | None = None) -> bool:
    return _fits(estimate(model, s, anchor=anchor), usable)


# Searches resolve the largest value that fits to within this fraction (never below 1 step): each replay of a
# 70B step takes a quarter of a second, and the allocator's slack moves in whole segments, so the exact last
# token is not worth a dozen replays. What they report always fits (it was replayed).
SEARCH_RESOLUTION = 0.005
# Replays spent moving the first guess next to the boundary before the walk: a guess from a far anchor (2048
# tokens when the answer is 444) misses by a few %, one from a replay a few % away by a token or two.
REANCHOR_STEPS = 2


def _largest(model: ModelSpec, s: Settings, usable: int, key: str, cap: int, anchor: Estimate | None = None) -> int:
    """Largest value of `key` (batch or seq) in [1, cap] that fits, to within SEARCH_RESOLUTION, by replays; 0 if
    1 does not fit. The first guess is what fits with the slack of a replayed neighbour (no replay); replays then
    walk from it with doubling steps and bisect the bracket, so a good guess costs two or three replays."""
    anchor = anchor or estimate(model, s)
    seen: dict[int, bool] = {}
    if anchor.settings == s and anchor.replay is not None:  # the caller's own value, replayed: never report less
        seen[getattr(s, key)] = fits_with_margin(anchor, usable)

    def ok(v: int) -> bool:
        if v not in seen:
            seen[v] = fits(model, s.with_(**{key: v}), usable)
        return seen[v]

    guess = min(max(_search(model, s, usable, key, 1, cap, anchor), 1), cap)
    for _ in range(REANCHOR_STEPS):  # the proxy is best near its anchor: replay the guess, guess again from it
        if guess in seen:
            break
        near = estimate(model, s.with_(**{key: guess}))
        seen[guess] = _fits(near, usable)
        again = min(max(_search(model, s, usable, key, 1, cap, near), 1), cap)
        if abs(again - guess) <= max(1, int(guess * SEARCH_RESOLUTION)) and seen[guess]:
            break  # the replayed guess fits and the proxy around it agrees: the walk below brackets it
        guess = again
    step = max(1, int(guess * SEARCH_RESOLUTION))
    if ok(guess):
        lo = guess
        while lo + step <= cap and ok(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, cap + 1)
    else:
        hi = guess
        while hi - step >= 1 and not ok(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)
        if lo == 0 and hi > 1 and ok(1):
            lo = 1
    # lo fits (or is 0), hi does not (or is past the cap): bisect down to the resolution
    while hi - lo > max(1, int(lo * SEARCH_RESOLUTION)):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    # The reserved peak is not monotone in tokens, and the bisection stops short of the last token: the answer is
    # the largest value any replay found to fit within the cap (so a plan that fits never reports a smaller max).
    return max([lo] + [v for v, f in seen.items() if f and v <= cap])


def _search(model: ModelSpec, s: Settings, usable: int, key: str, lo: int, hi: int, anchor: Estimate) -> int:
    """Largest value in [lo, hi] that fits with the anchor's slack (lo - 1 if none): doubling, then bisection."""
    if lo > hi or not fits(model, s.with_(**{key: lo}), usable, anchor):
        return lo - 1
    good, bad = lo, lo * 2
    while bad <= hi and fits(model, s.with_(**{key: bad}), usable, anchor):
        good, bad = bad, bad * 2
    bad = min(bad, hi + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(model, s.with_(**{key: mid}), usable, anchor):
            good = mid
        else:
            bad = mid
    return good


def max_batch(model: ModelSpec, s: Settings, usable: int, anchor: Estimate | None = None) -> int:
    return _largest(model, s, usable, "batch", MAX_BATCH_SEARCH, anchor)


def max_seq(model: ModelSpec, s: Settings, usable: int, anchor: Estimate | None = None) -> int:
    return _largest(model, s, usable, "seq", MAX_SEQ_SEARCH, anchor)


def _candidate_changes(
    model: ModelSpec, s: Settings, usable: int, current: Estimate | None = None
) -> list[tuple[str, str, Settings]]:
    c = []
    if not s.gradient_checkpointing:
        c.append(("turn on gradient checkpointing", "--gradient-checkpointing", s.with_(gradient_checkpointing=True)))
    if s.optimizer_kind != "paged_adamw_8bit":
        c.append(
            (
                "use the paged 8-bit AdamW optimizer",
                "--optimizer paged_adamw_8bit",
                s.with_(optimizer="paged_adamw_8bit"),
            )
        )
    if s.method == "full":
        c.append(("train LoRA adapters instead of all weights", "--method lora", s.with_(method="lora")))
    if s.method in ("full", "lora"):
        c.append(("use QLoRA (4-bit NF4 base)", "--method qlora", s.with_(method="qlora")))
    if s.method == "qlora" and s.upcast_non_quantized:
        c.append(
            (
                "keep embeddings, lm_head and norms 16-bit (skip peft's fp32 upcast)",
                "--no-upcast-non-quantized",
                s.with_(upcast_non_quantized=False),
            )
        )
    if s.method == "qlora" and not s.double_quant:
        c.append(("turn on double quantization", "--double-quant", s.with_(double_quant=True)))
    if current is not None and current.fragmentation_bytes and "expandable_segments:True" not in s.alloc_conf:
        conf = ",".join(x for x in (s.alloc_conf, "expandable_segments:True") if x)
        c.append(
            (
                f"train with PYTORCH_CUDA_ALLOC_CONF={conf} (the allocator grows segments instead of caching "
                f"fixed ones; its reserved peak is {current.fragmentation_bytes / 2**30:.2f} GiB above the "
                "allocated one)",
                f"--alloc-conf {conf}",
                s.with_(alloc_conf=conf),
            )
        )
    if s.uses_adapters and s.rank > 8:
        c.append(("lower the LoRA rank to 8", "--rank 8", s.with_(rank=8)))
    if s.batch > 1:
        b = max_batch(model, s, usable, current)
        if 1 <= b < s.batch:
            accum = -(-s.batch * s.grad_accum // b)
            c.append(
                (
                    f"micro-batch {b} with gradient accumulation {accum} (same effective batch)",
                    f"--batch {b} --grad-accum {accum}",
                    s.with_(batch=b, grad_accum=accum),
                )
            )
    seq = max_seq(model, s, usable, current)
    if 1 <= seq < s.seq:
        c.append((f"shorten sequences to {seq} tokens", f"--seq {seq}", s.with_(seq=seq)))
    return c


SHARDABLE = (
    "weights_4bit",
    "quant_constants",
    "weights_dense",
    "lora_adapters",
    "optimizer_states",
    "gradients",
    "paged_optimizer",
)


def sharded_device_bytes(e: Estimate, n: int) -> int:
    """First-order ZeRO-3 / FSDP full-shard estimate: parameters, gradients and optimizer states divide by the
    number of GPUs; activations, workspaces and the CUDA context do not (gathering a layer's parameters and
    communication buffers are ignored)."""
    shardable = sum(e.components.get(k, 0) for k in SHARDABLE)
    return e.peak_device_bytes - shardable + -(-shardable // n)


def gpus_if_sharded(e: Estimate, usable: int, most: int = 8) -> int:
    """Smallest GPU count (2..most) whose per-GPU share fits; 0 if none."""
    for n in range(2, most + 1):
        if (sharded_device_bytes(e, n) - e.paged_bytes // n) * (1 + e.overheads.margin(e.settings.method)) <= usable:
            return n
    return 0


def suggestions(model: ModelSpec, s: Settings, gpu: GpuSpec, usable: int, current: Estimate) -> list[Suggestion]:
    out = []
    for change, flags, new in _candidate_changes(model, s, usable, current):
        try:
            e = estimate(model, new, anchor=current)
            if _fits(e, usable) or _fits(e, round(usable * 1.1)):  # what may decide the verdict is replayed
                e = estimate(model, new)
        except InputError:
            continue
        ok = _fits(e, usable)
        if e.resident_device_bytes >= current.resident_device_bytes:
            continue  # saves nothing here
        out.append(
            # peft's fp32 upcast and the allocator's settings are what users rarely know they chose: flag them
            # when they flip the verdict
            Suggestion(
                change,
                flags,
                new,
                e.peak_device_bytes,
                ok,
                decides_verdict=flags.startswith(("--no-upcast-non-quantized", "--alloc-conf"))
                and ok != _fits(current, usable),
                tight=ok and _tight(e, usable),
            )
        )
    if not any(x.fits for x in out):
        # no single change is enough: stack the memory savers that keep the training recipe
        combo, names, flags = s, [], []
        for change, flag, new in _candidate_changes(model, s, usable, current):
            if flag.startswith(("--seq", "--batch")):
                continue
            combo = combo.with_(**{k: v for k, v in new.to_dict().items() if v != s.to_dict()[k]})
            names.append(change)
            flags.append(flag)
        if names and combo != s:
            e = estimate(model, combo)
            out.append(
                Suggestion("all of: " + "; ".join(names), " ".join(flags), combo, e.peak_device_bytes, _fits(e, usable))
            )
    n = gpus_if_sharded(current, usable)
    if n and not _fits(current, usable):
        out.append(
            Suggestion(
                f"{n} GPUs with FSDP / ZeRO-3 (rough: weights, gradients and optimizer states split {n} ways)",
                "(launch with FSDP full-shard)",
                s,
                sharded_device_bytes(current, n),
                True,
            )
        )
    bigger = bigger_gpu(current, gpu)
    if bigger:
        out.append(Suggestion(bigger[1], f"--gpu {bigger[0]}", s, current.peak_device_bytes, True))
    return out


# Cards whose memory is within this fraction of the smallest one that fits count as one size class ("80 GB":
# A100-80GB reports 81,920 MiB, H100 81,559 MiB). The question is memory, so among them the plan names the older
# generation first (a newer card of the same memory is faster but rents for more and is scarcer) and lists the
# others, instead of whichever reports a few hundred MiB less.
SIZE_CLASS = 0.10


def bigger_gpu(e: Estimate, gpu: GpuSpec) -> tuple[str, str] | None:
    """(profile, sentence) for the GPU profile with more memory on which `e` fits and that runs its compute dtype
    (a T4 has no bf16), or None."""
    bf16 = e.settings.compute_dtype == "bf16"
    fitting = [
        g
        for g in map(resolve_gpu, gpu_names())
        if g.memory_total_bytes > gpu.memory_total_bytes
        and (g.bf16_supported or not bf16)
        and _fits(e, usable_bytes(g))
    ]
    if not fitting:
        return None
    smallest = min(g.memory_total_bytes for g in fitting)
    same_class = sorted(
        (g for g in fitting if g.memory_total_bytes <= smallest * (1 + SIZE_CLASS)),
        key=lambda g: (g.launch_year or 9999, g.memory_total_bytes, g.name),
    )
    pick, others = same_class[0], [g.name for g in same_class[1:]]
    return pick.name, f"a GPU with more memory: {pick.name}" + (f" (or {', '.join(others)})" if others else "")


# Data-parallel scaling until the multi-GPU model (issue 13) exists: an assumption, stated in the plan's note, not a
# measurement. DDP overlaps the gradient all-reduce with backward; for LoRA / QLoRA the adapters' gradients are a
# few MB, for full fine-tuning each step moves 2x the parameters' bytes over the interconnect, which NVLink hides and
# PCIe does not.
DATA_PARALLEL_EFFICIENCY = 0.9


# Below this share of GPU-busy time a step is host-bound (plan says so: a faster GPU would not help it)
HOST_BOUND = 0.5


def data_parallel_efficiency(count: int) -> float:
    return 1.0 if count <= 1 else DATA_PARALLEL_EFFICIENCY


def _throughput(p: Plan, model: ModelSpec, s: Settings, gpu: GpuSpec) -> None:
    from .estimate.throughput import mfu

    tm = p.estimate.overheads.throughput_model()
    if tm is None:
        return
    p.step_seconds = tm.step_seconds(model, s, gpu)
    p.tokens_per_sec = tm.tokens_per_second(model, s, gpu)
    if p.tokens_per_sec:
        # GPUs beyond the first run data-parallel copies (per-GPU memory as planned): the epoch divides among them
        p.epoch_seconds = p.epoch_tokens / (p.tokens_per_sec * gpu.count * data_parallel_efficiency(gpu.count))
        if p.price_per_hour:
            p.cost_usd = p.epoch_seconds * p.epochs / 3600 * p.price_per_hour * gpu.count
        p.mfu, p.hfu = mfu(model, s, gpu, p.tokens_per_sec)
        step, _, busy = tm.breakdown(model, s, gpu)
        p.gpu_busy = round(busy / step, 4)
        if p.gpu_busy < HOST_BOUND:
            p.notes.append(
                f"step time: host-bound (the GPU computes {p.gpu_busy:.0%} of the predicted step; kernel launches and "
                "Python calls take the rest): a larger micro-batch adds little time per step, a faster GPU saves little"
            )
        p.step_time_band = round(tm.uncertainty(gpu), 4)
        p.step_time_constants = tm.constants_for(gpu)[1]
        if p.step_time_constants != gpu.name:
            p.notes.append(
                f"step time: {gpu.name} has no measured runs; the kernel and launch constants are "
                f"{p.step_time_constants}'s (efficiencies as fractions of {gpu.name}'s own datasheet peak and "
                "bandwidth; host costs assume a similar CPU), so the band is wider than the one shown"
            )
    elif s.compute_dtype == "fp32":
        p.notes.append("step time: not predicted for fp32 compute (the GPU profiles carry 16-bit tensor-core peaks)")


def from_trace(e: Estimate, t) -> Estimate:
    """The estimate with `trace`'s peaks and breakdown (a TraceResult) in place of the step program's."""
    from dataclasses import replace

    comps = {k: v for k, v in t.breakdown.items() if v}
    comps["allocator_reserve"] = t.peak_reserved_bytes - sum(comps.values())
    comps["cuda_context"] = t.context_bytes
    if t.paged_bytes:
        comps["paged_optimizer"] = t.paged_bytes
    return replace(
        e,
        peak_allocated_bytes=t.peak_allocated_bytes,
        peak_reserved_bytes=t.peak_reserved_bytes,
        peak_device_bytes=t.peak_device_bytes,
        paged_bytes=t.paged_bytes,
        components=comps,
        peak_phase=t.peak_allocated_phase or e.peak_phase,
        fragmentation_bytes=t.peak_reserved_bytes - t.peak_allocated_bytes,
        device_low_bytes=min(e.device_low_bytes, t.peak_device_bytes),
        device_high_bytes=max(e.device_high_bytes, t.peak_device_bytes),
        replay=None,  # the peaks are the trace's, not this replay's (plan's searches replay the estimator)
        notes=[
            *e.notes,
            f"answered by trace ({t.versions.get('torch', '?')}, {t.steps} steps, {t.seconds.get('wall', 0):.0f} s); "
            f"the estimator said {e.peak_device_bytes / 2**30:.2f} GiB on the device",
        ],
    )


def plan(
    model: ModelSpec,
    s: Settings,
    gpu: GpuSpec,
    epoch_tokens: int = 100_000_000,
    traced=None,
    epochs: float = 1.0,
    price: float | None = None,
    searches: bool = True,
) -> Plan:
    """`traced(model, settings)`: a TraceResult to answer with instead of the estimator (plan --trace); `price`:
    US dollars per GPU-hour instead of the profile's; `searches`: find the largest batch and sequence that fit."""
    e = estimate(model, s)
    if traced is not None:
        e = from_trace(e, traced(model, s))
    usable = usable_bytes(gpu)
    ok = _fits(e, usable)
    verdict = "does not fit" if not ok else ("tight" if _tight(e, usable) else "fits")
    margin = e.overheads.margin(s.method)
    notes = []
    if gpu.count > 1:
        notes.append(
            f"planned per GPU: {gpu.count} GPUs would run data-parallel copies (time per epoch assumes "
            f"{DATA_PARALLEL_EFFICIENCY:.0%} scaling, not measured); sharding the model across GPUs (FSDP / "
            "DeepSpeed ZeRO-3) is not modelled yet"
        )
    if gpu.generic:
        notes.append(f"generic GPU: {gpu.name} total, minus the driver's idle use measured on an H100")
    if not gpu.bf16_supported and s.compute_dtype == "bf16":
        notes.append(f"{gpu.name} has no bf16: use --compute-dtype fp16 (same memory)")
    if ok and e.peak_device_bytes > usable:
        notes.append("fits only because paged optimizer states can spill to host memory (slower steps)")
    if s.method == "qlora" and not s.upcast_non_quantized:
        up = estimate(model, s.with_(upcast_non_quantized=True))
        if ok and not _fits(up, usable):
            notes.append(
                "fits only without peft's fp32 upcast of embeddings/lm_head/norms: your trainer must not "
                "call prepare_model_for_kbit_training (or must undo its cast)"
            )
    if not ok:
        r = retry_replay(model, s, e, usable)
        if r is not None:
            notes.append(
                f"at the limit: the step's cache ({e.peak_reserved_bytes / 2**30:.2f} GiB reserved) does not fit, but "
                "its tensors do: torch frees cached blocks and retries when cudaMalloc fails, and replayed that way "
                f"the step completes ({r.peak_reserved / 2**30:.2f} GiB reserved, {r.alloc_retries} retries, each a "
                "synchronizing cudaFree): it may run, slower; the verdict counts the cache"
            )
    if model.max_position_embeddings and s.seq > model.max_position_embeddings:
        notes.append(
            f"seq {s.seq:,} is longer than the model's context (max_position_embeddings "
            f"{model.max_position_embeddings:,}): it would need RoPE scaling, and quality beyond the trained "
            "context is not assured"
        )
    if model.defaulted:
        notes.append(
            f"{model.name}: config.json does not set "
            + ", ".join(f"{k} (so {shown(v)})" for k, v in model.defaulted)
            + f": transformers' {model.model_type} defaults, as AutoConfig would use them"
        )
    p = Plan(
        estimate=e,
        gpu=gpu,
        usable_bytes=usable,
        fits=ok,
        verdict=verdict,
        headroom_bytes=usable - required_bytes(e),
        safety_margin=margin,
        max_batch=max_batch(model, s, usable, e) if searches else 0,
        max_seq=max_seq(model, s, usable, e) if searches else 0,
        notes=notes,
    )
    p.epoch_tokens, p.epochs = epoch_tokens, epochs
    p.price_per_hour = price if price is not None else gpu.price_per_hour
    p.price_source = "--price" if price is not None else gpu.price_source
    _throughput(p, model, s, gpu)
    if (not ok or verdict == "tight") and searches:
        p.suggestions = suggestions(model, s, gpu, usable, e)
    return p


def infer_plan(model, s: Settings, gpu, inf) -> dict:
    """Every serving mode for one model / adapter / workload on one GPU, plus the merge and the adapter size."""
    from dataclasses import replace

    from .estimate.inference import MODES, adapter_bytes, adapter_file_bytes, estimate_inference, merge_peak

    usable = usable_bytes(gpu)
    modes = []
    for mode in MODES:
        e = estimate_inference(model, s, inf, mode)

        def ok(b, mode=mode):
            return estimate_inference(model, s, replace(inf, batch=b), mode).peak_device_bytes <= usable

        lo, hi = 0, 1
        while hi <= 65536 and ok(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1 and lo:  # binary search between the last fitting power of two and the next
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        modes.append({**e.to_dict(), "fits": e.peak_device_bytes <= usable, "max_batch": lo})
    m = merge_peak(model, s, usable)
    notes = []
    if model.max_position_embeddings and inf.context > model.max_position_embeddings:
        notes.append(
            f"context {inf.context:,} is longer than the model's (max_position_embeddings "
            f"{model.max_position_embeddings:,}): it would need RoPE scaling, and quality beyond it is not assured"
        )
    return {
        "notes": notes,
        "model": model.name,
        "gpu": gpu.label,
        "gpu_memory_bytes": gpu.memory_total_bytes,
        "usable_bytes": usable,
        "settings": s.to_dict(),
        "serving": {k: getattr(inf, k) for k in ("batch", "context", "prompt", "adapters", "kv_dtype")},
        "modes": modes,
        "adapter": {
            "params": adapter_bytes(model, s) // 4,
            "memory_bytes": adapter_bytes(model, s),
            "file_bytes": adapter_file_bytes(model, s),
        },
        "merge": {
            "peak_bytes": m.peak_bytes,
            "components": m.components,
            "fits_gpu": m.fits_gpu,
            "path": "GPU" if m.fits_gpu else "CPU (needs this much host RAM)",
            "merged_file_bytes": m.merged_file_bytes,
        },
    }


# ---- which card, which settings ----------------------------------------------------------------------------------
@dataclass
class Option:
    """A configuration the plan chose (for a GPU, or as the fastest settings): its plan, or None if none fits."""

    gpu: GpuSpec
    settings: Settings
    plan: Plan | None
    why: str = ""  # what was changed, or why nothing fits

    def to_dict(self) -> dict:
        p = self.plan
        return {
            "gpu": self.gpu.label,
            "settings": self.settings.to_dict(),
            "describe": self.settings.describe(),
            "fits": bool(p and p.fits),
            "verdict": p.verdict if p else "does not fit",
            "peak_device_bytes": p.estimate.peak_device_bytes if p else None,
            "usable_bytes": p.usable_bytes if p else usable_bytes(self.gpu),
            "tokens_per_sec": p.tokens_per_sec if p else None,  # per GPU
            "tokens_per_sec_total": p.total_tokens_per_sec if p else None,
            "step_seconds": p.step_seconds if p else None,
            "epoch_seconds": p.epoch_seconds if p else None,
            "price_per_hour": p.price_per_hour if p else self.gpu.price_per_hour,
            "cost_usd": p.cost_usd if p and p.fits else None,
            "why": self.why,
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def best_on(model: ModelSpec, s: Settings, gpu: GpuSpec, epoch_tokens: int, epochs: float = 1.0, price=None) -> Option:
    """The largest micro-batch that divides the requested global batch (batch x accumulation, split evenly across
    the GPUs of a count such as 4xrtx-4090) and fits on `gpu`, with the accumulation that keeps the global batch;
    its plan (throughput, time, cost). Divisors are tried from the largest; the memory proxy (batch 1's replayed
    slack) skips those far over, the rest are replayed (replays are memoized, so ranking many GPUs replays each
    micro-batch once)."""
    usable = usable_bytes(gpu)
    global_batch = s.batch * s.grad_accum
    if global_batch % gpu.count:
        return Option(gpu, s, None, f"the global batch {global_batch} does not split across {gpu.count} GPUs")
    per_gpu = global_batch // gpu.count
    one = estimate(model, s.with_(batch=1, grad_accum=1))
    for micro in sorted(_divisors(per_gpu), reverse=True):
        chosen = s.with_(batch=micro, grad_accum=per_gpu // micro)
        if micro > 1 and not _fits(estimate(model, chosen, anchor=one), round(usable * 1.05)):
            continue
        if fits_with_margin(estimate(model, chosen), usable):
            why = "" if chosen == s else f"micro-batch {micro} x accumulation {per_gpu // micro}"
            p = plan(model, chosen, gpu, epoch_tokens, epochs=epochs, price=price, searches=False)
            return Option(gpu, chosen, p, why)
    return Option(gpu, s, None, f"batch 1 x {s.seq:,} tokens does not fit")


def _rank_key(o: Option):
    p = o.plan
    fits = bool(p and p.fits)
    cost = p.cost_usd if p and p.cost_usd is not None else float("inf")
    time = p.epoch_seconds if p and p.epoch_seconds else float("inf")
    return (not fits, cost, time, o.gpu.name)


def rank_gpus(model, s: Settings, gpus: list[GpuSpec], epoch_tokens: int, epochs: float = 1.0, price=None) -> list:
    """`plan --gpu all`: for each GPU the best configuration that fits, ranked by cost for the epochs (cards without
    a price after those with one, by time), then those on which nothing fits."""
    return sorted((best_on(model, s, g, epoch_tokens, epochs, price) for g in gpus), key=_rank_key)


def _settings_variants(model: ModelSpec, s: Settings) -> list[tuple[Settings, str]]:
    """What `--fastest` may change and keep the training recipe: micro-batch x accumulation (same global batch),
    gradient checkpointing, the attention backend, paged vs plain optimizer states."""
    global_batch = s.batch * s.grad_accum
    optimizers = {s.optimizer}
    pairs = {"paged_adamw_8bit": "adamw_8bit", "adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "adamw_torch"}
    if s.optimizer_kind in pairs:
        optimizers.add(pairs[s.optimizer_kind])
    # (Gemma-2 trains with eager attention or flash-attention 2 only: transformers refuses sdpa with its softcapping)
    attns = sorted({s.attn, "eager"} | (set() if model.model_type == "gemma2" else {"sdpa"}))
    out = []
    for micro in _divisors(global_batch):
        for gc in (True, False):
            for attn in attns:
                for opt in sorted(optimizers):
                    v = s.with_(
                        batch=micro, grad_accum=global_batch // micro, gradient_checkpointing=gc, attn=attn,
                        optimizer=opt,
                    )  # fmt: skip
                    changes = [
                        f"micro-batch {micro} x accumulation {global_batch // micro}" if micro != s.batch else "",
                        ("gradient checkpointing " + ("on" if gc else "off")) if gc != s.gradient_checkpointing else "",
                        f"attention {attn}" if attn != s.attn else "",
                        f"optimizer {opt}" if opt != s.optimizer else "",
                    ]
                    out.append((v, "; ".join(c for c in changes if c) or "your settings"))
    return out


def fastest(model, s: Settings, gpu: GpuSpec, epoch_tokens: int, epochs: float = 1.0, price=None) -> list[Option]:
    """`plan --fastest`: the fastest settings that fit (same model, method and global batch), then the user's own.
    Every variant is priced (milliseconds each); they are tried fastest first, the memory proxy (the user's own
    replayed slack) skips the ones far over, and the first that fits when replayed wins."""
    tm = overheads().throughput_model()
    if tm is None or tm.step_seconds(model, s, gpu) is None:
        raise InputError(
            f"--fastest needs predicted step times: {gpu.name} has no peak TFLOP/s or the calibration has none "
            "(name a GPU profile such as h100 or rtx-4090, compute dtype bf16 or fp16)"
        )
    usable = usable_bytes(gpu)
    own = estimate(model, s)
    # fastest first; among equally fast variants (paged and plain optimizer states run the same kernels) the one
    # that changes the fewest settings
    ranked = sorted(
        _settings_variants(model, s),
        key=lambda v: (
            -round(tm.tokens_per_second(model, v[0], gpu), 1),
            0 if v[1] == "your settings" else len(v[1].split("; ")),
        ),
    )
    best = None
    for v, why in ranked:
        try:
            if not _fits(estimate(model, v, anchor=own), round(usable * 1.05)):
                continue
            if fits_with_margin(estimate(model, v), usable):
                best = Option(
                    gpu, v, plan(model, v, gpu, epoch_tokens, epochs=epochs, price=price, searches=False), why
                )
                break
        except InputError:
            continue
    mine = Option(
        gpu, s, plan(model, s, gpu, epoch_tokens, epochs=epochs, price=price, searches=False), "your settings"
    )
    if best is None:
        return [mine]
    return [best] if best.settings == s else [best, mine]
