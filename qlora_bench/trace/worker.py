"""The trace worker: run in a fresh process with the fake-CUDA shim preloaded (qlora_bench.trace.shim).

    python -m qlora_bench.trace.worker REQUEST.json RESULT.json

Builds the model with the runner's own code (materialize.build_model / prepare_base / add_adapters /
build_optimizer) on fake CUDA tensors, runs `steps` optimizer steps with the runner's train_step, records every
allocation from the first parameter on, replays the events through the caching-allocator model and writes the
result (and the events, when asked) for the parent (qlora_bench.trace.trace).
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import sys
import time
from pathlib import Path

BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def _grads(model) -> list:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _optimizer_tensors(opt) -> list:
    import torch

    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _quant_state_tensors(model) -> list:
    out = []
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is None:
            continue
        out += [qs.absmax, qs.code, getattr(qs, "offset", None)]
        if getattr(qs, "state2", None) is not None:
            out += [qs.state2.absmax, qs.state2.code]
    if out:  # bitsandbytes keeps the blockwise (double quantization) map in a module-level cache
        import bitsandbytes.functional as F

        out += list(F.name2qmap.values())
    return [t for t in out if t is not None]


def _tag_timeline(events: list, points: int) -> list:
    """[event index, {tag: live bytes}] at the highest point of each of `points` equal runs of events (sizes rounded
    as the allocator rounds them, to 512 B): a plot of these keeps every step's peak, where sampling every n-th
    event misses the short spikes of the loss and the first backward layer."""
    from . import CATEGORIES as TAGS

    live = dict.fromkeys(TAGS, 0)
    size_tag: dict[int, tuple[int, str]] = {}
    bucket = max(1, -(-len(events) // max(points, 1)))
    out, total, best, best_at = [], 0, -1, None
    for i, e in enumerate(events):
        if e[0] == "alloc":
            n = max(512, (e[2] + 511) // 512 * 512)
            size_tag[e[1]] = (n, e[3])
            live[e[3]] += n
            total += n
        elif e[0] == "free":
            n, tag = size_tag.pop(e[1], (0, None))
            if tag is not None:
                live[tag] -= n
                total -= n
        if total > best:
            best, best_at = total, [i, {k: v for k, v in live.items() if v}]
        if (i + 1) % bucket == 0 or i == len(events) - 1:
            out.append(best_at)
            best = -1
    return out


def _replays_empty_cache(replay) -> bool:
    """Whether the allocator model takes ("empty_cache",) events (torch.cuda.empty_cache: cached segments with
    nothing allocated go back to the driver)."""
    from ..errors import InputError

    try:
        replay([("empty_cache",)])
    except InputError:
        return False
    return True


def run(req: dict) -> dict:
    t_start = time.perf_counter()
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..estimate.allocator import AllocatorConfig, replay
    from ..profiles import model_from_config
    from ..run.materialize import add_adapters, build_model, build_optimizer, prepare_base
    from ..run.probes import versions
    from ..run.train import RunOptions, token_rows, train_step
    from ..settings import Settings
    from . import patches
    from .tracer import Recorder

    if torch._C._get_accelerator().type != "cuda":
        raise RuntimeError("the fake-CUDA shim is not loaded (run through qlora_bench.trace.trace)")
    spec = model_from_config(req["config"], req["model"], "trace request")
    s = Settings.from_dict(req["settings"], "trace request settings")
    uses_bnb = s.method == "qlora" or s.optimizer_kind in BNB_OPTIMIZERS
    steps = req["steps"]
    device = torch.device("cuda")

    # real tensors reaching an op (a meta scalar a model builds with torch.tensor under the meta device, as
    # Gemma-2 does) become fake ones instead of an error
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    rec = Recorder(workspace_bytes=req["cublas_workspace_bytes"])
    patches.apply(rec, fake, uses_bnb, s.attn)
    t_imported = time.perf_counter()
    step_seconds = []
    with fake, rec:
        rec.phase("load", "load")
        model = build_model(spec, s, device)
        model = prepare_base(model, s)
        model = add_adapters(model, spec, s)
        opt = build_optimizer(model, s)
        x, _ = token_rows(spec, s, RunOptions(), s.batch, torch.Generator().manual_seed(0))
        x = x.to(device)
        rec.classify(list(model.parameters()) + list(model.buffers()), "parameters")
        rec.classify(_quant_state_tensors(model), "quant_state")
        rec.classify([x], "inputs")
        param_bytes = {}
        for p in {id(p): p for p in model.parameters()}.values():
            k = str(p.dtype).replace("torch.", "")
            param_bytes[k] = param_bytes.get(k, 0) + p.untyped_storage().nbytes()
        t_built = time.perf_counter()

        step = [0]
        backward_done = [False]

        def mark(kind: str) -> None:
            if kind == "bwd":
                rec.end_forward()
            if kind in ("fwd", "opt") and backward_done[0]:
                rec.classify(_grads(model), "gradients")
            if kind == "bwd":
                backward_done[0] = True
            if kind == "zero":
                rec.classify(_optimizer_tensors(opt), "optimizer_states")
            rec.phase(f"{kind}{step[0]}", kind)

        for i in range(steps):
            step[0] = i + 1
            backward_done[0] = False
            t0 = time.perf_counter()
            train_step(model, opt, x, s, device, mark=mark)
            step_seconds.append(round(time.perf_counter() - t0, 3))
        rec.phase("end", "zero")
    t_traced = time.perf_counter()

    events = rec.finish()
    notes = []
    replayed = events
    if not _replays_empty_cache(replay):
        replayed = [e for e in events if e[0] != "empty_cache"]
        if len(replayed) != len(events):
            notes.append(
                "torch.cuda.empty_cache() (peft, after the fp32 upcast) was called but not replayed: the allocator "
                "model does not take that event yet, so the load's cached segments stay reserved and are reused "
                "(on the 8B QLoRA trace the reserved peak came out 0.26 GiB lower than with the release)"
            )
    r = replay(replayed, config=AllocatorConfig.parse(s.alloc_conf), timeline_points=req["points"])
    t_replayed = time.perf_counter()
    paged = rec.paged_peak
    context = req["cuda_context_bytes"] + (req["bnb_runtime_bytes"] if uses_bnb else 0)
    phases = [(i, e[1]) for i, e in enumerate(replayed) if e[0] == "phase"]
    out = {
        "model": spec.name,
        "settings": s.to_dict(),
        "steps": steps,
        "peak_allocated_bytes": r.peak_allocated,
        "peak_reserved_bytes": r.peak_reserved,
        "peak_device_bytes": r.peak_reserved + context + paged,
        "paged_bytes": paged,
        "allocated_at_peak_reserved_bytes": r.allocated_at_peak_reserved,
        "fragmentation_at_peak": r.fragmentation_at_peak,
        "reserved_at_peak_allocated_bytes": next((p[2] for p in r.timeline if p[0] == r.peak_allocated_event), None),
        "peak_allocated_phase": r.peak_allocated_phase,
        "peak_reserved_phase": r.peak_reserved_phase,
        "breakdown": dict(r.live_by_tag_at_peak),
        "segments_at_peak": r.segments_at_peak,
        "oom": r.oom,
        "context_bytes": context,
        "cuda_context_bytes": req["cuda_context_bytes"],
        "bnb_runtime_bytes": req["bnb_runtime_bytes"] if uses_bnb else 0,
        "cublas_workspace_bytes": req["cublas_workspace_bytes"],
        "flash_scratch_bytes": rec.flash_scratch_bytes,
        "attention": dict(sorted(rec.attention.items())),
        "param_bytes_by_dtype": dict(sorted(param_bytes.items())),
        "ops": rec.n_ops,
        "op_calls": _op_calls(rec.op_calls),
        "events": len(events),
        "allocations": sum(1 for e in events if e[0] == "alloc"),
        "seconds": {
            "import": round(t_imported - t_start, 3),
            "build": round(t_built - t_imported, 3),
            "steps": step_seconds,
            "replay": round(t_replayed - t_traced, 3),
        },
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "versions": versions(),
        "timeline": [list(t) for t in r.timeline],
        "tag_timeline": _tag_timeline(replayed, req["points"]),
        "phases": phases,
        "notes": notes,
    }
    if req.get("events_path"):
        write_events(Path(req["events_path"]), events, rec.ops)
    return out


def _op_calls(calls: dict) -> dict:
    """{phase: {op: calls}} for the step phases (fwd1, bwd1, opt1, zero1, ...), ops sorted by name."""
    out: dict[str, dict[str, int]] = {}
    for (phase, op), n in sorted(calls.items()):
        if phase not in ("load", "end"):
            out.setdefault(phase, {})[op] = n
    return out


def write_events(path: Path, events: list, ops: dict) -> None:
    """One JSON array per line (gzip when the name ends in .gz); an allocation carries the op that made it as a
    fifth field."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for e in events:
            row = [*e, ops.get(e[1], "")] if e[0] == "alloc" else list(e)
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def main(argv: list[str]) -> int:
    os.environ.pop("LD_PRELOAD", None)  # this process has the shim; what it starts must not
    req = json.loads(Path(argv[0]).read_text())
    from ..run.quiet import quiet_libraries

    with quiet_libraries():  # before bitsandbytes is imported: its import-time notice about optional kernels
        out = run(req)
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
