"""The trace in the terminal: peaks next to plan's estimate, the breakdown at the allocated peak, what it cost."""

from __future__ import annotations

from rich.markup import escape

from ..render import _g, console, table
from . import CATEGORY_LABELS, TraceResult, _category_order


def render(r: TraceResult, spec) -> None:
    from ..estimate import estimate

    s = r.settings
    console.print(f"[bold]{escape(r.model)} · {escape(s.describe())} · {r.steps} traced steps on fake CUDA[/bold]")
    e = estimate(spec, s)
    t = table(None, "GiB", "trace", "plan", "peak in", numeric=("trace", "plan"))
    t.add_row("peak allocated (torch)", _g(r.peak_allocated_bytes), _g(e.peak_allocated_bytes), r.peak_allocated_phase)
    t.add_row("peak reserved (torch)", _g(r.peak_reserved_bytes), _g(e.peak_reserved_bytes), r.peak_reserved_phase)
    t.add_row("peak device (NVML)", _g(r.peak_device_bytes), _g(e.peak_device_bytes), "")
    if r.paged_bytes or e.paged_bytes:
        t.add_row("  of which paged optimizer states", _g(r.paged_bytes), _g(e.paged_bytes), "")
    t.add_row("  of which CUDA context + libraries", _g(r.context_bytes), "", "")
    if r.reserved_at_peak_allocated_bytes is not None:
        cached = r.reserved_at_peak_allocated_bytes - r.peak_allocated_bytes
        t.add_row("cached, unused at the allocated peak", _g(cached), "", r.peak_allocated_phase)
    console.print(t)

    total = sum(r.breakdown.values()) or 1
    b = table(
        f"allocated at its peak ({r.peak_allocated_phase}), by category", "", "GiB", "share", numeric=("GiB", "share")
    )
    for tag in sorted(r.breakdown, key=_category_order):
        n = r.breakdown[tag]
        b.add_row(CATEGORY_LABELS.get(tag, tag), _g(n), f"{n / total:.0%}")
    console.print(b)

    sec = r.seconds
    steps = ", ".join(f"{x:.1f}" for x in sec["steps"])
    v = r.versions
    console.print(
        f"[dim]{r.ops:,} ops, {r.allocations:,} allocations; {sec['wall']:.1f} s wall (import {sec['import']:.1f} s, "
        f"build {sec['build']:.1f} s, steps {steps} s, replay {sec['replay']:.2f} s"
        + (f", shim built in {sec['shim_build']:.1f} s" if sec.get("shim_build") else "")
        + f"); worker RSS {r.max_rss_bytes / 2**30:.2f} GiB · torch {v.get('torch')} · transformers "
        f"{v.get('transformers')} · peft {v.get('peft')} · bitsandbytes {v.get('bitsandbytes')}[/dim]"
    )
    if r.oom:
        console.print(f"[bold red]out of memory[/bold red] in the replay: {escape(str(r.oom))}")
    for n in r.notes:
        console.print(f"[dim]note:[/dim] {escape(n)}")
