"""Terminal rendering with rich (the same data as --json). Every table must read at 80 columns: numbers never
wrap, text columns fold at word boundaries, and record ids, which are long paths, become short unique labels."""

from __future__ import annotations

import os
import sys

from rich import box
from rich.console import Console
from rich.table import Table

from .estimate import LABELS
from .plan import Plan
from .units import GiB


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """`qlora-bench plan ... | head`: rich exits 1 here; the reader just stopped reading, which is not a
        failure. Point stdout at /dev/null (so the interpreter's final flush stays quiet) and let main() return 0."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise BrokenPipeError


console = _Console()

_STYLE = {"fits": "bold green", "tight": "bold yellow", "does not fit": "bold red"}


def _g(n: int) -> str:
    return f"{n / GiB:,.2f}"


def _count(n: int) -> str:
    """8,030,261,248 -> '8.03 B'; 41,943,040 -> '41.9 M'."""
    if n >= 1e9:
        return f"{n / 1e9:,.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:,.1f} M"
    return f"{n:,}"


def table(title: str | None = None, *columns: str, numeric: tuple[str, ...] = ()) -> Table:
    """A table in the house style: a simple head rule and no vertical borders (they cost 3 columns each at 80);
    numeric columns right-aligned and never wrapped; text columns fold at spaces."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for c in columns:
        if c in numeric:
            t.add_column(c, justify="right", no_wrap=True)
        else:
            t.add_column(c, overflow="fold")
    return t


def note(text: str) -> None:
    console.print(f"[dim]{text}[/dim]")


def trainer_config(tc, model_note: str, overridden: dict) -> None:
    """What `plan --config` read from a trainer's file: each setting with the key (or default) it came from, what
    the plan does not model, and every key it did not use."""
    from rich.markup import escape

    from .trainer_config import TOOL_NAMES

    console.print(f"[bold]{escape(tc.path)}[/bold]: {TOOL_NAMES[tc.tool]} config; {escape(model_note)}")
    t = table(None, "setting", "value", "from")
    for k, v in tc.values.items():
        src = "the command line" if k in overridden else tc.read_from[k]
        t.add_row(k.replace("_", " "), _setting(overridden.get(k, v)), escape(src))
    console.print(t)
    for n in tc.not_modelled:
        console.print(f"[yellow]not modelled[/yellow]: {escape(n)}")
    if tc.no_effect:
        console.print(f"[dim]not used (no effect on memory or speed): {escape(', '.join(tc.no_effect))}[/dim]")
    if tc.unknown:
        console.print(f"not used (keys qlora-bench does not know): {escape(', '.join(tc.unknown))}")
    console.print()


def _setting(v) -> str:
    return {True: "on", False: "off"}.get(v, str(v)) if isinstance(v, bool) else str(v)


def _title(p: Plan) -> str:
    e, s = p.estimate, p.estimate.settings
    return f"{e.model.name} · {s.describe()} · on {p.gpu.label}"


def plan(p: Plan) -> None:
    e = p.estimate
    console.print(f"[bold]{_title(p)}[/bold]")
    style = _STYLE[p.verdict]
    over = "headroom" if p.headroom_bytes >= 0 else "over by"
    paged = (
        f", of which {_g(e.paged_bytes)} GiB are paged optimizer states that can spill to host memory"
        if e.paged_bytes
        else ""
    )
    console.print(
        f"[{style}]{p.verdict.upper()}[/{style}]: peak {_g(e.peak_device_bytes)} GiB on the device "
        f"(band {_g(e.device_low_bytes)}-{_g(e.device_high_bytes)}){paged}; "
        f"{_g(e.resident_device_bytes)} GiB must stay resident"
        + (
            f" ({_g(p.usable_bytes - p.headroom_bytes)} with the {p.safety_margin:.1%} safety margin)"
            if p.safety_margin
            else ""
        )
        + f" of {_g(p.usable_bytes)} GiB usable: {over} {_g(abs(p.headroom_bytes))} GiB"
    )
    t = table(f"memory at the peak (phase: {e.peak_phase})", "component", "GiB", "share", numeric=("GiB", "share"))
    for k, v in e.components.items():
        if _g(v) not in ("0.00", "-0.00"):  # folded small tensors: nothing to read in a 0.00 line
            t.add_row(LABELS.get(k, k), _g(v), f"{v / e.peak_device_bytes:.0%}")
    t.add_section()
    t.add_row("torch peak allocated", _g(e.peak_allocated_bytes), "")
    t.add_row("torch peak reserved", _g(e.peak_reserved_bytes), "")
    t.add_row("[bold]device peak (nvidia-smi)[/bold]", f"[bold]{_g(e.peak_device_bytes)}[/bold]", "100%")
    console.print(t)
    s = e.settings
    console.print(
        f"params {_count(e.total_params)}, trainable {_count(e.trainable_params)} · "
        f"largest micro-batch at seq {s.seq:,}: [bold]{_largest(p.max_batch)}[/bold] · "
        f"longest sequence at batch {s.batch}: [bold]{_largest(p.max_seq)}[/bold]"
    )
    console.print(_speed_line(p))
    _suggestions(p)
    for n in e.notes + p.notes:
        console.print(f"[dim]note:[/dim] {n}")
    if not e.overheads.calibrated:
        console.print("[yellow]note: overheads are uncalibrated literature defaults[/yellow]")


def _largest(n: int) -> str:
    return f"{n:,}" if n else "none fits"


def _suggestions(p: Plan) -> None:
    """What would fit, and apart from it what saves memory but not enough (with how far it stays over)."""
    fitting = [x for x in p.suggestions if x.fits]
    close = sorted((x for x in p.suggestions if not x.fits), key=lambda x: x.peak_device_bytes)
    if fitting:
        title = "changes that would fit" if not p.fits else "changes that add headroom"
        t = table(title, "flags", "device GiB", "change", numeric=("device GiB",))
        for x in fitting:
            t.add_row(
                x.flags,
                _g(x.peak_device_bytes),
                x.change
                + (" [bold](decides the verdict)[/bold]" if x.decides_verdict else "")
                + (" [yellow](tight: the top of the band does not fit)[/yellow]" if x.tight else ""),
            )
        console.print(t)
    if close:
        t = table(
            "changes that save memory but do not fit alone", "flags", "device GiB", "change", numeric=("device GiB",)
        )
        for x in close:
            t.add_row(x.flags, _g(x.peak_device_bytes), x.change)
        console.print(t)


def _duration(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h:,} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def _speed_line(p: Plan) -> str:
    if p.tokens_per_sec is None:
        if not p.gpu.dense_tflops:
            why = "the GPU's peak TFLOP/s is unknown: name a GPU profile"
        elif p.estimate.settings.compute_dtype == "fp32":
            why = "fp32 compute: the GPU profiles carry 16-bit peaks"
        else:
            why = "uncalibrated"
        return f"[dim]throughput: not predicted ({why})[/dim]"
    band = f" ±{p.step_time_band:.0%}" if p.step_time_band else ""
    gpus = f" on {p.gpu.count} GPUs" if p.gpu.count > 1 else ""
    epochs = "" if p.epochs == 1 else f" x {p.epochs:g} epochs"
    cost = (
        f", ~${p.cost_usd:,.2f} at ${p.price_per_hour:g}/GPU-hour{epochs}"
        if p.cost_usd is not None
        else " (no price for this GPU: --price USD_PER_HOUR)"
    )
    return (
        f"predicted ~{p.tokens_per_sec:,.0f} tokens/s{band} ({p.step_seconds:.2f} s per step, MFU {p.mfu:.0%}, "
        f"HFU {p.hfu:.0%}); {_tokens(p.epoch_tokens)} tokens in ~{_duration(p.epoch_seconds)}{gpus}{cost} "
        f"[dim](kernels priced and queued per step; constants fitted on {p.step_time_constants} runs; the band is "
        "their worst leave-one-out error; MFU counts 6N+3A FLOPs per token for full fine-tuning, 4N+3A for "
        "adapters, HFU adds the recompute)[/dim]"
    )


def _span(seconds: float) -> str:
    """A compact duration for table cells: 45 s, 3.9 min, 4.9 h, 1,250 h."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 360000 else f"{seconds / 3600:,.0f} h"


def _money(usd: float) -> str:
    return f"${usd:,.0f}" if usd >= 100 else f"${usd:,.2f}"


def gpu_ranking(model, s, options: list, epoch_tokens: int, epochs: float) -> None:
    """`plan --gpu all`: one row per card, the best configuration that fits, ranked by cost."""
    ep = "" if epochs == 1 else f" x {epochs:g}"
    console.print(
        f"[bold]{model.name} · {s.describe()} · global batch {s.batch * s.grad_accum} · "
        f"{_tokens(epoch_tokens)} tokens{ep}[/bold]"
    )
    t = table(None, "GPU", "batch x acc", "peak GiB", "tokens/s", "time", "$/GPU-h", "cost",
              numeric=("batch x acc", "peak GiB", "tokens/s", "time", "$/GPU-h", "cost"))  # fmt: skip
    t.columns[0].no_wrap = True
    for o in options:
        p = o.plan
        if p is None:
            t.add_row(o.gpu.label, "-", "-", "-", "-", "-", "-")
            continue
        st = p.estimate.settings
        t.add_row(
            o.gpu.label,
            f"{st.batch} x {st.grad_accum}",
            _g(p.estimate.peak_device_bytes),
            "-" if p.total_tokens_per_sec is None else f"{p.total_tokens_per_sec:,.0f}",
            "-" if p.epoch_seconds is None else _span(p.epoch_seconds * epochs),
            "-" if p.price_per_hour is None else f"{p.price_per_hour:g}",
            "-" if p.cost_usd is None else _money(p.cost_usd),
        )
    console.print(t)
    why: dict[str, list[str]] = {}
    for o in options:
        if o.plan is None:
            why.setdefault(o.why, []).append(o.gpu.label)
    for reason, names in why.items():
        note(f"{reason}: {', '.join(names)}")
    unknown = [o.gpu.label for o in options if o.plan and o.plan.tokens_per_sec is None]
    if unknown:
        note(f"no time predicted for {', '.join(unknown)}: a bare size has no peak TFLOP/s (name a GPU profile)")
    if any(o.gpu.count > 1 for o in options):
        note(
            "a count (4xrtx-4090) splits the global batch across its GPUs; tokens/s is all of them at an assumed "
            "90% data-parallel scaling"
        )
    if any(o.plan and o.plan.price_source == "--price" for o in options):
        note("prices: --price for every card")
    elif any(o.plan and o.plan.price_per_hour for o in options):
        note(
            "prices: typical on-demand US$ per GPU-hour, with source and date in profiles/gpus/*.json; cards "
            "without one rank after, by time (--price sets one for all)"
        )
    note(
        "each card: the largest micro-batch that divides the global batch and fits (with the margin), "
        "accumulation making up the rest; time from the step-time model (constants fitted on the measured GPU, "
        "transferred to the others: see `plan --gpu NAME`)"
    )


def fastest(model, options: list) -> None:
    """`plan --fastest`: the fastest settings that fit, beside the user's own."""
    best = options[0]
    p = best.plan
    console.print(f"[bold]{model.name} on {best.gpu.label}: the fastest settings that fit[/bold]")
    t = table(None, "", "settings", "tokens/s", "peak GiB", "time", "cost",
              numeric=("tokens/s", "peak GiB", "time", "cost"))  # fmt: skip
    for o in options:
        q = o.plan
        if o is not best:
            label = "yours"
        else:
            label = "fastest" if len(options) > 1 else ("yours (fastest)" if q.fits else "yours")
        t.add_row(
            label,
            q.estimate.settings.describe(),
            "-" if q.tokens_per_sec is None else f"{q.tokens_per_sec:,.0f}",
            f"{_g(q.estimate.peak_device_bytes)}" + ("" if q.fits else " (does not fit)"),
            "-" if q.epoch_seconds is None or not q.fits else _duration(q.epoch_seconds * q.epochs),
            "-" if q.cost_usd is None or not q.fits else _money(q.cost_usd),
        )
    console.print(t)
    if len(options) > 1:
        mine = options[1].plan
        gain = (p.tokens_per_sec / mine.tokens_per_sec - 1) if mine.tokens_per_sec else 0
        console.print(f"change: {best.why} ({gain:+.0%} tokens/s)")
    else:
        note("your settings are the fastest of those searched that fit" if p.fits else "nothing searched fits")
    note(
        "searched: micro-batch x accumulation (same global batch), gradient checkpointing, attention backend, "
        "paged vs plain optimizer states; method, model, LoRA rank and targets kept"
    )


def _tokens(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:,.4g}{unit}"
    return f"{n:,}"


def plans_side_by_side(plans: list[Plan]) -> None:
    first = plans[0]
    console.print(
        f"[bold]{first.estimate.model.name} on {first.gpu.label}[/bold] "
        f"({_g(first.usable_bytes)} GiB usable) · batch {first.estimate.settings.batch} x seq "
        f"{first.estimate.settings.seq:,}"
    )
    methods = [p.estimate.settings.method for p in plans]
    t = table(None, "GiB", *methods, numeric=tuple(methods))
    order = [k for k in LABELS if any(k in p.estimate.components for p in plans)]
    for k in order:
        t.add_row(LABELS.get(k, k), *(_g_or_dash(p.estimate.components.get(k)) for p in plans))
    t.add_section()
    t.add_row("torch peak allocated", *(_g(p.estimate.peak_allocated_bytes) for p in plans))
    t.add_row("[bold]device peak[/bold]", *(f"[bold]{_g(p.estimate.peak_device_bytes)}[/bold]" for p in plans))
    t.add_row("headroom", *(_g(p.headroom_bytes) for p in plans))
    t.add_row("verdict", *(f"[{_STYLE[p.verdict]}]{p.verdict}[/{_STYLE[p.verdict]}]" for p in plans))
    t.add_row("largest micro-batch", *(_largest(p.max_batch) for p in plans))
    t.add_row("longest sequence", *(_largest(p.max_seq) for p in plans))
    t.add_row("tokens/s (predicted)", *("-" if p.tokens_per_sec is None else f"{p.tokens_per_sec:,.0f}" for p in plans))
    console.print(t)
    console.print(
        "[dim]each column is its method's worst moment of a step (its peak phase): "
        + "; ".join(
            f"{p.estimate.settings.method} at {p.estimate.peak_phase} with {p.estimate.settings.optimizer}"
            for p in plans
        )
        + ". Components that peak at other moments are not in that column.[/dim]"
    )
    notes = []
    for p in plans:
        notes += [n for n in p.estimate.notes + p.notes if n not in notes]
    for n in notes:
        console.print(f"[dim]note:[/dim] {n}")


def _g_or_dash(n) -> str:
    return _g(n) if n else "-"


def profiles() -> None:
    from .profiles import gpu_names, gpu_profile, load_model_profile, model_names, model_profile, resolve_gpu

    # the aliases are what people type: they get the room; sizes from 100 columns, hub ids from 120
    sizes, wide = console.width >= 100, console.width >= 120
    cols = (
        ["name", "aliases", "params"] + (["layers", "hidden", "vocab"] if sizes else []) + (["hub id"] if wide else [])
    )
    t = table("models", *cols, numeric=("params", "layers", "hidden", "vocab"))
    for name in model_names():
        m, p = load_model_profile(name), model_profile(name)
        row = [name, ", ".join(p.aliases), _count(m.total_params)]
        row += [str(m.num_layers), f"{m.hidden_size:,}", f"{m.vocab_size:,}"] if sizes else []
        t.add_row(*row, *([p.hf_id or ""] if wide else []))
    t.columns[0].no_wrap = True
    console.print(t)
    if not wide:
        note("layers, hidden size, vocabulary and hub ids: qlora-bench profiles --json, or a wider terminal")
    g = table(
        "GPUs (or a size: 24gb, 48GiB; a count: 2x24gb)",
        "name",
        "aliases",
        "GiB",
        "bf16",
        "TFLOP/s",
        "GB/s",
        numeric=("GiB", "TFLOP/s", "GB/s"),
    )
    for name in gpu_names():
        spec, p = resolve_gpu(name), gpu_profile(name)
        g.add_row(
            name,
            ", ".join(p.aliases),
            _g(spec.memory_total_bytes),
            "yes" if spec.bf16_supported else "no",
            f"{spec.dense_tflops:g}" if spec.dense_tflops else "-",
            f"{spec.memory_bandwidth_GBps:g}" if spec.memory_bandwidth_GBps else "-",
        )
    g.columns[0].no_wrap = True
    console.print(g)


def _gib_or_dash(n) -> str:
    return "-" if n is None else _g(n)


def run_record(rec: dict, spec) -> None:
    """One measured configuration next to the estimator's prediction for it."""
    from rich.markup import escape

    from .estimate import estimate
    from .run.outcome import STYLE, error_line
    from .settings import Settings

    m = rec.get("measured") or {}
    outcome = rec["outcome"]
    style = STYLE.get(outcome, "bold yellow")
    console.print(f"[bold]{escape(rec['id'])}[/bold]  [{style}]{outcome}[/{style}]")
    if rec.get("error"):  # on its own line, in full
        console.print(error_line(rec, ""))
    env = rec.get("environment") or {}
    console.print(
        f"[dim]{env.get('gpu_name') or 'CPU'} · torch {env.get('versions', {}).get('torch')} · "
        f"transformers {env.get('versions', {}).get('transformers')} · peft "
        f"{env.get('versions', {}).get('peft')} · bitsandbytes {env.get('versions', {}).get('bitsandbytes')}"
        "[/dim]"
    )
    if outcome == "error":  # nothing was measured: the estimate alone is `plan`'s job
        for n in rec.get("notes") or []:
            console.print(f"[dim]note:[/dim] {escape(n)}")
        return
    e = estimate(spec, Settings.from_dict(rec["settings"]))
    t = Table()
    t.add_column("GiB")
    t.add_column("measured", justify="right")
    t.add_column("estimated", justify="right")
    t.add_row("peak allocated (torch)", _gib_or_dash(m.get("peak_allocated_bytes")), _g(e.peak_allocated_bytes))
    t.add_row("peak reserved (torch)", _gib_or_dash(m.get("peak_reserved_bytes")), _g(e.peak_reserved_bytes))
    t.add_row("peak device (NVML)", _gib_or_dash(m.get("peak_device_bytes")), _g(e.peak_device_bytes))
    t.add_row("paged optimizer states", _gib_or_dash(m.get("optimizer_state_paged_bytes")), _g(e.paged_bytes))
    console.print(t)
    if m.get("tokens_per_sec"):
        console.print(
            f"tokens/s {m['tokens_per_sec']:,.0f} (median of {m['timed_steps']} steps; "
            f"{m['tokens_per_sec_min']:,.0f}-{m['tokens_per_sec_max']:,.0f}) · "
            f"loss {m['losses'][0]:.3f} -> {m['losses'][-1]:.3f}"
        )
    for n in rec.get("notes") or []:
        console.print(f"[dim]note:[/dim] {escape(n)}")


def sweep_summary(summary, out) -> None:
    t = Table(title=f"sweep results -> {out}", title_justify="left")
    for c in ("configuration", "outcome", "peak alloc GiB", "device GiB", "tokens/s"):
        t.add_column(c, justify="left" if c in ("configuration", "outcome") else "right")
    for r in summary.records:
        m = r.get("measured") or {}
        tps = m.get("tokens_per_sec")
        t.add_row(
            r["id"],
            r["outcome"],
            _gib_or_dash(m.get("peak_allocated_bytes")),
            _gib_or_dash(m.get("peak_device_bytes")),
            f"{tps:,.0f}" if tps else "-",
        )
    console.print(t)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items()))
    console.print(f"ran {len(summary.records)} ({counts or 'nothing'}); {summary.skipped_done} already done (resumed)")


def short_labels(ids: list[str]) -> list[str]:
    """Unique short labels for record ids (`model/method/r16/nf4-dq/optimizer/bsBxS/gc[/more]`): model, method
    and batch x sequence, plus the parts in which a record departs from the others with the same three."""
    parts = [i.split("#")[0].split("/") for i in ids]
    head = [p[:2] + [x for x in p[2:] if x.startswith("bs")] for p in parts]
    rest = [[x for x in p[2:] if not x.startswith("bs")] for p in parts]
    groups: dict[tuple, list[int]] = {}
    for k, h in enumerate(head):
        groups.setdefault(tuple(h), []).append(k)
    labels = [" ".join(h) for h in head]
    for members in groups.values():
        if len(members) < 2:
            continue
        width = max(len(rest[k]) for k in members)
        at = [[rest[k][pos] if pos < len(rest[k]) else None for pos in range(width)] for k in members]
        # each record shows only where it departs from what most of its group has (the common recipe shows none)
        common = [max((a[pos] for a in at), key=[a[pos] for a in at].count) for pos in range(width)]
        for k, a in zip(members, at, strict=True):
            labels[k] = " ".join(head[k] + [v for v, c in zip(a, common, strict=True) if v is not None and v != c])
    return [x if labels.count(x) == 1 else f"{x} #{k + 1}" for k, x in enumerate(labels)]


def _legend() -> None:
    note("record: model, method, micro-batch x sequence (+ what tells repeats apart); full ids with --json")


def results_table(records) -> None:
    from .profiles import slug_for

    t = table(
        f"{len(records)} records",
        "record",
        "outcome",
        "gpu",
        "alloc GiB",
        "reserved",
        "device",
        "tokens/s",
        numeric=("alloc GiB", "reserved", "device", "tokens/s"),
    )
    for label, r in zip(short_labels([r.id for r in records]), records, strict=True):
        m = r.measured
        env = r.data.get("environment") or {}
        tps = m.get("tokens_per_sec")
        t.add_row(
            label,
            r.data.get("outcome", "?"),
            slug_for(env.get("gpu_name")),
            _gib_or_dash(m.get("peak_allocated_bytes")),
            _gib_or_dash(m.get("peak_reserved_bytes")),
            _gib_or_dash(m.get("peak_device_bytes")),
            f"{tps:,.0f}" if tps else "-",
        )
    console.print(t)
    _legend()


def _pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def validation(rows, summaries) -> None:
    labels = short_labels([x.record.id for x in rows])
    memory = [(label, x) for label, x in zip(labels, rows, strict=True) if x.has_memory]
    wide = console.width >= 100  # the static / optimizer-state columns only where they do not squeeze the labels
    cols = ["record", "set", "alloc", "err", "device", "err "] + (["static", "optim"] if wide else []) + ["fits?"]
    mem = table(
        "memory: estimate vs measurement (GiB; err = predicted / measured - 1)",
        *cols,
        numeric=("alloc", "err", "device", "err ", "static", "optim"),
    )
    for label, x in memory:
        m = x.measured
        fit = (
            "-" if x.fits_predicted is None else ("FALSE FIT" if x.false_fit else ("yes" if x.fits_predicted else "no"))
        )
        static = [_pct(x.error("static_after_load_bytes")), _pct(x.error("optimizer_state_bytes"))] if wide else []
        mem.add_row(
            label,
            "held" if x.held_out else "fit",
            _gib_or_dash(m["peak_allocated_bytes"]),
            _pct(x.error("peak_allocated_bytes")),
            _gib_or_dash(m["peak_device_bytes"]),
            _pct(x.error("peak_device_bytes")),
            *static,
            fit,
        )
    console.print(mem)
    note(
        "set: fit = the calibration was fitted on it, held = held out; "
        + ("static: memory after load and wrap; optim: optimizer state bytes; " if wide else "")
        + "fits?: what plan says on the record's GPU"
        + ("" if wide else "; static and optimizer-state errors: --json or 100+ columns")
    )
    tput = table(
        "throughput: estimate vs measurement",
        "record",
        "tokens/s",
        "predicted",
        "err",
        "left out",
        "step s",
        "MFU",
        "HFU",
        numeric=("tokens/s", "predicted", "err", "left out", "step s", "MFU", "HFU"),
    )
    for label, x in zip(labels, rows, strict=True):
        tp = x.throughput
        if not tp.get("tokens_per_sec"):
            continue
        tput.add_row(
            label,
            f"{tp['tokens_per_sec']:,.0f}",
            f"{tp['tokens_per_sec_predicted']:,.0f}" if tp.get("tokens_per_sec_predicted") else "-",
            _pct(tp.get("error")),
            _pct(tp.get("error_left_out")),
            f"{tp['step_seconds']:.2f}" if tp.get("step_seconds") else "-",
            f"{tp['mfu']:.0%}" if tp.get("mfu") is not None else "-",
            f"{tp['hfu']:.0%}" if tp.get("hfu") is not None else "-",
        )
    if tput.row_count:
        console.print(tput)
        note(
            "err: the step-time model as calibrated; left out: refitted without that record (calibration.json); "
            "the memory sets below do not apply to step time, whose fit takes every record not held out by id"
        )
    cols = ("set", "n", "device", "allocated", "n ", "tokens/s", "false fits")
    s = table("summary: median / worst absolute error (n: records with memory, with tokens/s)", *cols, numeric=cols[1:])
    for name, sm in summaries.items():
        if not sm.n:
            continue

        def f(k, sm=sm):
            med, worst = sm.median_abs_error.get(k), sm.worst_abs_error.get(k)
            return "-" if med is None else f"{med:.1%} / {worst:.1%}"

        s.add_row(
            name,
            str(sm.n_memory),
            f("peak_device_bytes"),
            f("peak_allocated_bytes"),
            str(sm.n_throughput),
            f("tokens_per_sec"),
            str(sm.false_fits),
        )
    s.columns[0].no_wrap = True
    console.print(s)
    long = max((sm.long_step_records for sm in summaries.values() if sm.n), default=0)
    note(f"{long} record(s) with steps of at least 1 s (where throughput repeats within ~1 %)")
    from .estimate.overhead import overheads

    ov = overheads()
    margins = ", ".join(f"{k} {v:.1%}" for k, v in sorted(ov.safety_margin.items()) if k != "default")
    note(
        f"safety margins plan adds before 'fits' (largest device under-prediction with the record held out of the "
        f"fit): {margins}; reserved band: -{ov.reserved_error_over:.1%} / +{ov.reserved_error_under:.1%}"
    )
    _legend()


def comparison(cmp) -> None:
    """One row per configuration: the change of each metric, coloured by its status, and the worst status."""
    style = {
        "regression": "bold red",
        "missing": "bold red",
        "improved": "green",
        "within noise": "yellow",
        "new": "cyan",
        "ok": "",
    }
    rank = ["ok", "new", "improved", "within noise", "missing", "regression"]
    short = {
        "peak_allocated_bytes": "allocated",
        "peak_reserved_bytes": "reserved",
        "peak_device_bytes": "device",
        "tokens_per_sec": "tokens/s",
    }
    by_config: dict[str, dict] = {}
    for c in cmp.changes:
        by_config.setdefault(c.config, {})[c.metric] = c
    t = table(
        f"changes against the baseline ({cmp.gpu})", "record", *short.values(), "status", numeric=tuple(short.values())
    )
    for label, metrics in zip(short_labels(list(by_config)), by_config.values(), strict=True):
        cells = []
        for key in short:
            c = metrics.get(key)
            if c is None or c.change is None:
                cells.append("-")
            else:
                st = style.get(c.status) or "dim"
                cells.append(f"[{st}]{c.change:+.1%}[/{st}]")
        worst = max(metrics.values(), key=lambda c: rank.index(c.status)).status
        st = style.get(worst) or "dim"
        t.add_row(label, *cells, f"[{st}]{worst}[/{st}]")
    console.print(t)
    _legend()
    tol = {c.metric: c.tolerance for c in cmp.changes if c.tolerance is not None}
    if tol:
        console.print(
            "[dim]tolerances: memory +{:.1%}; tokens/s -{:.1%} or the measured spread, whichever is "
            "larger[/dim]".format(
                tol.get("peak_device_bytes", 0),
                min((c.tolerance for c in cmp.changes if c.metric == "tokens_per_sec" and c.tolerance), default=0),
            )
        )
    for lib, (old, new) in cmp.version_differences.items():
        console.print(f"[yellow]note:[/yellow] {lib} {old} -> {new} (library versions differ from the baseline)")
    n = len(cmp.regressions)
    console.print(f"[bold red]FAILED: {n} regression(s)[/bold red]" if n else "[bold green]no regression[/bold green]")


def inference(d: dict) -> None:
    sv = d["serving"]
    console.print(
        f"[bold]{d['model']} serving on {d['gpu']}[/bold] ({_g(d['usable_bytes'])} GiB usable) · batch "
        f"{sv['batch']} x {sv['context']:,} tokens of context · prefill {sv['prompt']:,} · "
        f"{sv['adapters']} adapter(s)"
    )
    from .estimate.inference import MODE_LABELS

    modes = [m["mode"] for m in d["modes"]]
    t = table(None, "GiB", *modes, numeric=tuple(modes))
    order = [
        "weights_16bit",
        "weights_4bit",
        "quant_constants",
        "adapters",
        "kv_cache",
        "working_set",
        "cublas_workspace",
        "allocator_reserve",
        "cuda_context",
    ]
    keys = [k for k in order if any(k in m["components"] for m in d["modes"])]
    names = {
        "weights_16bit": "16-bit weights",
        "weights_4bit": "4-bit weights",
        "quant_constants": "quantization constants",
        "adapters": "adapters (fp32)",
        "kv_cache": "KV cache",
        "working_set": "prefill working set",
        "cublas_workspace": "cuBLAS workspace",
        "allocator_reserve": "allocator cache",
        "cuda_context": "CUDA context + libraries",
    }
    for k in keys:
        t.add_row(names.get(k, k), *(_g_or_dash(m["components"].get(k)) for m in d["modes"]))
    t.add_section()
    t.add_row("[bold]device peak[/bold]", *(f"[bold]{_g(m['peak_device_bytes'])}[/bold]" for m in d["modes"]))
    t.add_row("fits", *(("[green]yes[/green]" if m["fits"] else "[red]no[/red]") for m in d["modes"]))
    t.add_row("largest batch", *(_largest(m["max_batch"]) for m in d["modes"]))
    console.print(t)
    note("; ".join(f"{m}: {MODE_LABELS[m]}" for m in modes))
    a, mg = d["adapter"], d["merge"]
    console.print(
        f"adapter: {a['params'] / 1e6:,.1f} M parameters, {_g(a['memory_bytes'])} GiB in memory (fp32), "
        f"{a['file_bytes'] / 1e6:,.0f} MB on disk"
    )
    console.print(
        f"merge (16-bit base + adapter, merge_and_unload): peak {_g(mg['peak_bytes'])} GiB -> "
        f"{mg['path']}; merged checkpoint {mg['merged_file_bytes'] / 1e9:,.1f} GB"
    )
    for n in d["notes"] + d["modes"][0]["notes"]:
        console.print(f"[dim]note:[/dim] {n}")


def infer_records(recs: list[dict], spec) -> None:
    """Measured serving modes next to the estimator's memory for the same mode."""
    from rich.markup import escape

    from .estimate.inference import InferSettings, estimate_inference
    from .run.outcome import error_line
    from .settings import Settings

    t = Table(title=f"serving {spec.name}", title_justify="left")
    t.add_column("mode", no_wrap=True)
    for c in (
        "outcome",
        "peak GiB",
        "estimated GiB",
        "prefill s (b1)",
        "decode tok/s b1",
        "decode tok/s bN",
        "switch ms",
    ):
        t.add_column(c, justify="right" if c != "outcome" else "left")
    for r in recs:
        m, sv = r.get("measured") or {}, r.get("serving") or {}
        mode = sv.get("mode")
        est = "-"
        if mode in ("base16", "adapters4", "merged16", "merged4"):
            inf = InferSettings(
                batch=sv.get("batch", 1),
                context=sv.get("prompt", 0) + sv.get("new_tokens", 0),
                prompt=sv.get("prompt", 1),
                adapters=1,
            )
            est = _g(estimate_inference(spec, Settings.from_dict(r["settings"]), inf, mode).peak_allocated_bytes)
        b = sv.get("batch")
        t.add_row(
            mode or "?",
            r["outcome"],
            _gib_or_dash(m.get("peak_allocated_bytes")),
            est,
            f"{m['prefill_seconds_b1']:.3f}" if m.get("prefill_seconds_b1") else "-",
            f"{m['decode_tokens_per_sec_b1']:,.1f}" if m.get("decode_tokens_per_sec_b1") else "-",
            f"{m[f'decode_tokens_per_sec_b{b}']:,.1f}" if m.get(f"decode_tokens_per_sec_b{b}") else "-",
            f"{m['switch_seconds'] * 1e3:.1f}" if m.get("switch_seconds") else "-",
        )
    console.print(t)
    for r in recs:  # what went wrong, in full: the table has no room for it
        if r["outcome"] != "ok":
            console.print(error_line(r, f"{(r.get('serving') or {}).get('mode') or '?'}: "))
    for n in (recs[0].get("notes") or []) if recs else []:
        console.print(f"[dim]note:[/dim] {escape(n)}")
