"""`qlora-bench trace`: one real training step on fake CUDA tensors, every allocation recorded, replayed through the
caching-allocator model (qlora_bench.estimate.allocator).

The model is built, prepared and trained by the runner's own code (qlora_bench.run.materialize, run.train's
train_step) under torch's FakeTensorMode on a fake "cuda" device: every op runs its meta kernel, so no memory is
used and no GPU is needed, while every tensor the real run would create is created, with its real size, in the
real order. A recorder (tracer.py) writes an event per new storage and per free, tagged by what the storage turned
out to be; the events are replayed through the allocator model for torch's allocated / reserved peaks. What the
trace cannot see is added explicitly: the cuBLAS workspace (at the first GEMM) and flash-attention's backward
scratch as allocations, the CUDA context and bitsandbytes' runtime (fitted constants) and paged optimizer state
(managed memory, counted apart) on top of reserved, as estimate() composes the device peak.

A CPU-only torch cannot run autograd on fake CUDA tensors by itself: a small C++ shim (shim.py) is built once and
preloaded into a worker process (worker.py). Version-tied library patches are in patches.py.

    from qlora_bench.trace import trace
    r = trace(resolve_model("8b"), Settings(), steps=3)
    r.peak_allocated_bytes, r.peak_reserved_bytes, r.peak_device_bytes, r.breakdown
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError
from ..profiles import ModelSpec
from ..settings import Settings

# The categories of the breakdown, in the order they are shown (tracer.py records with them)
CATEGORIES = (
    "parameters",
    "quant_state",
    "inputs",
    "load",
    "activations",
    "gradients",
    "optimizer_states",
    "temporaries",
    "workspaces",
)
CATEGORY_LABELS = {
    "parameters": "parameters and buffers",
    "quant_state": "quantization constants",
    "inputs": "input token ids",
    "load": "loading transients",
    "activations": "activations kept for backward",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "temporaries": "temporaries",
    "workspaces": "cuBLAS / attention workspaces",
}
MAX_STEPS = 20  # each step of a 70B model is ~15 s on a laptop CPU; 2-3 show where reserved settles
TIMELINE_POINTS = 800


class TraceFailed(RuntimeError):
    """The worker could not trace this configuration (a library refused it on fake tensors): one line."""


@dataclass
class TraceResult:
    model: str
    settings: Settings
    steps: int
    peak_allocated_bytes: int  # torch.cuda.max_memory_allocated(), from the allocator model
    peak_reserved_bytes: int  # torch.cuda.max_memory_reserved(), from the allocator model
    peak_device_bytes: int  # reserved + CUDA context (+ bitsandbytes runtime) + paged: what NVML would show
    paged_bytes: int  # managed (paged optimizer) memory, outside torch's allocator, at its largest
    allocated_at_peak_reserved_bytes: int
    fragmentation_at_peak_bytes: int  # reserved - allocated when reserved peaked: cached, unused
    reserved_at_peak_allocated_bytes: int | None  # reserved when allocated peaked
    peak_allocated_phase: str | None
    peak_reserved_phase: str | None
    breakdown: dict[str, int]  # category -> allocated bytes (block sizes) at the allocated peak
    segments_at_peak: int
    oom: dict | None
    context_bytes: int  # CUDA context + libraries (+ bitsandbytes runtime): added to reserved
    cublas_workspace_bytes: int
    flash_scratch_bytes: int  # the largest flash-attention backward scratch of one call (0: no flash backward)
    attention: dict[str, int]  # SDPA backend -> calls in the trace
    param_bytes_by_dtype: dict[str, int]  # after prepare and adapters: what the model holds
    ops: int
    n_events: int
    allocations: int
    seconds: dict  # import, build, steps (list), replay, shim_build, wall
    max_rss_bytes: int  # of the worker process
    versions: dict
    notes: list[str] = field(default_factory=list)
    timeline: list = field(default_factory=list, repr=False)  # [event index, allocated, reserved]
    tag_timeline: list = field(default_factory=list, repr=False)  # [event index, {category: bytes}] at bucket peaks
    phases: list = field(default_factory=list, repr=False)  # [event index, phase name]
    events: list | None = field(default=None, repr=False)  # ("alloc", key, nbytes, tag) ... when asked
    event_ops: dict | None = field(default=None, repr=False)  # key -> the op that allocated it, when asked
    # {phase: {aten op: calls}} of the ops that are not views, per step phase (fwd1, bwd1, opt1, zero1, ...): the
    # step's kernel inventory as the real libraries run it
    op_calls: dict = field(default_factory=dict, repr=False)

    def to_dict(self, timeline: bool = False) -> dict:
        d = asdict(self)
        d["settings"] = self.settings.to_dict()
        d["breakdown"] = {k: self.breakdown[k] for k in sorted(self.breakdown, key=_category_order)}
        d.pop("events")
        d.pop("event_ops")
        if not timeline:
            for k in ("timeline", "tag_timeline", "phases"):
                d.pop(k)
        return d


def _category_order(tag: str) -> int:
    return CATEGORIES.index(tag) if tag in CATEGORIES else len(CATEGORIES)


def uses_bitsandbytes(s: Settings) -> bool:
    return s.method == "qlora" or s.optimizer_kind in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def _notes(s: Settings, r: dict) -> list[str]:
    notes = list(r.get("notes", []))
    if s.attn == "flash_attention_2":
        notes.append(
            "attn flash_attention_2 traced as SDPA's flash backend: the same FlashAttention-2 kernels (torch vendors "
            "them), so the same tensors and backward scratch for unpadded, unpacked inputs"
        )
    elif r["attention"]:
        used = ", ".join(f"{k} x{v}" for k, v in r["attention"].items())
        notes.append(f"SDPA backend as a CUDA build picks it on sm80/sm90 (a CPU build would pick math): {used}")
    if r["attention"].get("efficient"):
        notes.append("memory-efficient attention's backward workspace is not modelled (its size depends on the kernel)")
    notes.append(
        "device peak = simulated reserved + CUDA context"
        + (" + bitsandbytes runtime" if r["bnb_runtime_bytes"] else "")
        + (" + paged optimizer state" if r["paged_bytes"] else "")
        + " (fitted constants, as plan composes it); the cuBLAS workspace is an allocation at the first GEMM"
    )
    return notes


def trace(
    spec: ModelSpec,
    settings: Settings,
    steps: int = 3,
    keep_events: bool = False,
    events_path: str | Path | None = None,
    timeline_points: int = TIMELINE_POINTS,
    timeout: float | None = None,
) -> TraceResult:
    """Trace `steps` optimizer steps of `spec` with `settings` in a worker process and return the result.
    keep_events: the events in the result (`events`, and `event_ops`: key -> op); events_path: also write them
    there (JSON lines, gzip for .gz; load_events reads them). Raises InputError when the shim cannot be built here,
    TraceFailed when the worker fails."""
    from ..estimate.overhead import overheads
    from . import shim

    s = settings.validated()
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps: expected a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    t0 = time.perf_counter()
    lib, build_seconds = shim.ensure_built()
    ov = overheads()
    with tempfile.TemporaryDirectory(prefix="qlora-bench-trace-") as tmp:
        tmp = Path(tmp)
        if events_path is None and keep_events:
            events_path = tmp / "events.jsonl"
        req = {
            "model": spec.name,
            "config": spec.config,
            "settings": s.to_dict(),
            "steps": steps,
            "points": timeline_points,
            "cublas_workspace_bytes": ov.cublas_workspace,
            "cuda_context_bytes": ov.cuda_context,
            "bnb_runtime_bytes": ov.bnb_runtime,
            "events_path": str(events_path) if events_path else None,
        }
        (tmp / "request.json").write_text(json.dumps(req))
        out_path = tmp / "result.json"
        try:
            p = subprocess.run(
                [sys.executable, "-m", "qlora_bench.trace.worker", str(tmp / "request.json"), str(out_path)],
                env=shim.preload_env(lib),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise TraceFailed(f"the trace took more than {timeout:g} s and was stopped") from None
        if p.returncode != 0 or not out_path.is_file():
            raise TraceFailed(_worker_error(p))
        r = json.loads(out_path.read_text())
        loaded = load_events(events_path) if keep_events else (None, None)
    r["seconds"]["shim_build"] = round(build_seconds, 3)
    r["seconds"]["wall"] = round(time.perf_counter() - t0, 3)
    return TraceResult(
        model=r["model"],
        settings=s,
        steps=steps,
        peak_allocated_bytes=r["peak_allocated_bytes"],
        peak_reserved_bytes=r["peak_reserved_bytes"],
        peak_device_bytes=r["peak_device_bytes"],
        paged_bytes=r["paged_bytes"],
        allocated_at_peak_reserved_bytes=r["allocated_at_peak_reserved_bytes"],
        fragmentation_at_peak_bytes=r["fragmentation_at_peak"],
        reserved_at_peak_allocated_bytes=r["reserved_at_peak_allocated_bytes"],
        peak_allocated_phase=r["peak_allocated_phase"],
        peak_reserved_phase=r["peak_reserved_phase"],
        breakdown=r["breakdown"],
        segments_at_peak=r["segments_at_peak"],
        oom=r["oom"],
        context_bytes=r["context_bytes"],
        cublas_workspace_bytes=r["cublas_workspace_bytes"],
        flash_scratch_bytes=r["flash_scratch_bytes"],
        attention=r["attention"],
        param_bytes_by_dtype=r["param_bytes_by_dtype"],
        ops=r["ops"],
        n_events=r["events"],
        allocations=r["allocations"],
        seconds=r["seconds"],
        max_rss_bytes=r["max_rss_bytes"],
        versions=r["versions"],
        notes=_notes(s, r),
        timeline=r["timeline"],
        tag_timeline=r["tag_timeline"],
        phases=r["phases"],
        events=loaded[0],
        event_ops=loaded[1],
        op_calls=r.get("op_calls", {}),
    )


def _worker_error(p: subprocess.CompletedProcess) -> str:
    """The worker's exception, one line (its last traceback line), or how it died."""
    lines = [line for line in (p.stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith((" ", "\t")) and ("Error" in line or "Exception" in line)]
    if p.returncode < 0:
        return f"the trace worker was killed by signal {-p.returncode}" + (f": {lines[-1][:300]}" if lines else "")
    last = (errors or lines or ["no output"])[-1]
    return f"the trace worker failed: {' '.join(last.split())[:400]}"


def load_events(path: str | Path) -> tuple[list[tuple], dict]:
    """Events written by `trace(events_path=path)`: (events in the allocator model's format, key -> op name)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    events, ops = [], {}
    with opener(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            if row[0] == "alloc":
                events.append(("alloc", row[1], row[2], row[3]))
                ops[row[1]] = row[4] if len(row) > 4 else ""
            else:
                events.append(tuple(row))
    return events, ops


# ops that launch no kernel: views' bookkeeping, device queries, the profiler's markers
NOT_KERNELS = frozenset({"device", "_unsafe_view", "_record_function_enter_new", "_record_function_exit"})


def layer_op_calls(spec: ModelSpec, settings: Settings, step: int = 2) -> dict:
    """Per decoder layer, the ops (not views) one training step runs, forward and backward (backward includes the
    checkpointed recompute), as the real libraries run them: the difference between traces of the model cut to 3
    and to 2 layers. What estimate/steptime.py's kernel inventory is checked against."""
    import dataclasses

    calls = []
    for n in (2, 3):
        cut = dataclasses.replace(spec, num_layers=n, config={**spec.config, "num_hidden_layers": n})
        calls.append(trace(cut, settings, steps=step, timeline_points=0))
    out = {"versions": calls[1].versions}
    for phase in ("fwd", "bwd"):
        a, b = (c.op_calls.get(f"{phase}{step}", {}) for c in calls)
        diff = {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if k not in NOT_KERNELS}
        out[phase] = {k: v for k, v in diff.items() if v}
    return out
