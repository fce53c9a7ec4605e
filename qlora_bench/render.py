"""Terminal rendering with rich (tables right-justify numbers; the same data as --json)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .estimate import LABELS
from .plan import Plan
from .units import GiB

console = Console()

_STYLE = {"fits": "bold green", "tight": "bold yellow", "does not fit": "bold red"}


def _g(n: int) -> str:
    return f"{n / GiB:,.2f}"


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
    t = Table(title=f"memory at the peak (phase: {e.peak_phase})", title_justify="left")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("share", justify="right")
    for k, v in e.components.items():
        t.add_row(LABELS.get(k, k), _g(v), f"{v / e.peak_device_bytes:.0%}")
    t.add_section()
    t.add_row("torch peak allocated", _g(e.peak_allocated_bytes), "")
    t.add_row("torch peak reserved", _g(e.peak_reserved_bytes), "")
    t.add_row("[bold]device peak (nvidia-smi)[/bold]", f"[bold]{_g(e.peak_device_bytes)}[/bold]", "100%")
    console.print(t)
    s = e.settings
    console.print(
        f"params {e.total_params / 1e9:.2f} B, trainable {e.trainable_params / 1e6:,.1f} M · "
        f"largest micro-batch at seq {s.seq}: [bold]{p.max_batch}[/bold] · "
        f"longest sequence at batch {s.batch}: [bold]{p.max_seq:,}[/bold]"
    )
    console.print(_speed_line(p))
    if p.suggestions:
        title = "changes that would fit" if not p.fits else "changes that add headroom"
        st = Table(title=title, title_justify="left")
        st.add_column("change")
        st.add_column("flags")
        st.add_column("device GiB", justify="right")
        st.add_column("fits")
        for x in p.suggestions:
            mark = "[green]yes[/green]" if x.fits else "[red]no[/red]"
            st.add_row(
                x.change + (" [bold](decides the verdict)[/bold]" if x.decides_verdict else ""),
                x.flags,
                _g(x.peak_device_bytes),
                mark,
            )
        console.print(st)
    for n in e.notes + p.notes:
        console.print(f"[dim]note:[/dim] {n}")
    if not e.overheads.calibrated:
        console.print("[yellow]note: overheads are uncalibrated literature defaults[/yellow]")


def _duration(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def _speed_line(p: Plan) -> str:
    if p.tokens_per_sec is None:
        why = "the GPU's peak TFLOP/s is unknown: name a GPU profile" if not p.gpu.dense_tflops else "uncalibrated"
        return f"[dim]throughput: not predicted ({why})[/dim]"
    return (
        f"predicted ~{p.tokens_per_sec:,.0f} tokens/s ({p.step_seconds:.2f} s per step, MFU {p.mfu:.0%}); "
        f"{p.epoch_tokens / 1e6:,.0f}M tokens in ~{_duration(p.epoch_seconds)} "
        "[dim](fitted on H100 steps < 1 s: optimistic for long steps)[/dim]"
    )


def plans_side_by_side(plans: list[Plan]) -> None:
    first = plans[0]
    console.print(
        f"[bold]{first.estimate.model.name} on {first.gpu.label}[/bold] "
        f"({_g(first.usable_bytes)} GiB usable) · batch {first.estimate.settings.batch} x seq "
        f"{first.estimate.settings.seq}"
    )
    t = Table()
    t.add_column("GiB")
    for p in plans:
        t.add_column(p.estimate.settings.method, justify="right")
    keys = []
    for p in plans:
        keys += [k for k in p.estimate.components if k not in keys]
    for k in keys:
        t.add_row(LABELS.get(k, k), *(_g(p.estimate.components.get(k, 0)) for p in plans))
    t.add_section()
    t.add_row("optimizer", *(p.estimate.settings.optimizer for p in plans))
    t.add_row("peak phase", *(p.estimate.peak_phase for p in plans))
    t.add_row("torch peak allocated", *(_g(p.estimate.peak_allocated_bytes) for p in plans))
    t.add_row("[bold]device peak[/bold]", *(f"[bold]{_g(p.estimate.peak_device_bytes)}[/bold]" for p in plans))
    t.add_row("headroom", *(_g(p.headroom_bytes) for p in plans))
    t.add_row("verdict", *(f"[{_STYLE[p.verdict]}]{p.verdict}[/{_STYLE[p.verdict]}]" for p in plans))
    t.add_row("largest micro-batch", *(str(p.max_batch) for p in plans))
    t.add_row("tokens/s (predicted)", *("-" if p.tokens_per_sec is None else f"{p.tokens_per_sec:,.0f}" for p in plans))
    t.add_row("longest sequence", *(f"{p.max_seq:,}" for p in plans))
    console.print(t)
    notes = []
    for p in plans:
        notes += [n for n in p.estimate.notes + p.notes if n not in notes]
    for n in notes:
        console.print(f"[dim]note:[/dim] {n}")


def profiles() -> None:
    from .profiles import _gpu_profiles, _model_profiles, load_model_profile, resolve_gpu

    t = Table(title="models", title_justify="left")
    t.add_column("name", no_wrap=True)
    t.add_column("aliases")
    for c in ("params", "layers", "hidden", "vocab"):
        t.add_column(c, justify="right", no_wrap=True)
    t.add_column("hub id", overflow="fold")
    for name, data in _model_profiles().items():
        m = load_model_profile(name)
        t.add_row(
            name,
            ", ".join(data.get("aliases", [])),
            f"{m.total_params / 1e9:.2f} B",
            str(m.num_layers),
            str(m.hidden_size),
            f"{m.vocab_size:,}",
            data.get("hf_id") or "",
        )
    console.print(t)
    g = Table(title="GPUs (also: 24gb, 48GiB, 2x24gb)", title_justify="left")
    g.add_column("name", no_wrap=True)
    g.add_column("aliases")
    for c in ("memory GiB", "bf16", "dense TFLOP/s", "GB/s"):
        g.add_column(c, justify="right", no_wrap=True)
    for name, data in _gpu_profiles().items():
        spec = resolve_gpu(name)
        g.add_row(
            name,
            ", ".join(data.get("aliases", [])),
            _g(spec.memory_total_bytes),
            "yes" if spec.bf16_supported else "no",
            f"{spec.dense_tflops:g}",
            f"{spec.memory_bandwidth_GBps:g}",
        )
    console.print(g)


def _gib_or_dash(n) -> str:
    return "-" if n is None else _g(n)


def run_record(rec: dict, spec) -> None:
    """One measured configuration next to the estimator's prediction for it."""
    from .estimate import estimate
    from .settings import Settings

    m = rec.get("measured") or {}
    style = {"ok": "bold green", "oom": "bold red"}.get(rec["outcome"], "bold yellow")
    console.print(
        f"[bold]{rec['id']}[/bold]  [{style}]{rec['outcome']}[/{style}]"
        + (f": {rec['error']}" if rec.get("error") else "")
    )
    env = rec.get("environment") or {}
    console.print(
        f"[dim]{env.get('gpu_name') or 'CPU'} · torch {env.get('versions', {}).get('torch')} · "
        f"transformers {env.get('versions', {}).get('transformers')} · peft "
        f"{env.get('versions', {}).get('peft')} · bitsandbytes {env.get('versions', {}).get('bitsandbytes')}"
        "[/dim]"
    )
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
        console.print(f"[dim]note:[/dim] {n}")


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


def results_table(records) -> None:
    t = Table(title=f"{len(records)} records", title_justify="left")
    for c in ("id", "outcome", "gpu", "alloc GiB", "reserved GiB", "device GiB", "tokens/s"):
        t.add_column(c, justify="left" if c in ("id", "outcome", "gpu") else "right")
    for r in records:
        m = r.data.get("measured") or {}
        env = r.data.get("environment") or {}
        tps = m.get("tokens_per_sec")
        t.add_row(
            r.data.get("id", "?"),
            r.data.get("outcome", "?"),
            env.get("gpu_name") or "cpu",
            _gib_or_dash(m.get("peak_allocated_bytes")),
            _gib_or_dash(m.get("peak_reserved_bytes")),
            _gib_or_dash(m.get("peak_device_bytes")),
            f"{tps:,.0f}" if tps else "-",
        )
    console.print(t)


def _pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def validation(rows, summaries) -> None:
    t = Table(title="estimate vs measurement (GiB; error = predicted / measured - 1)", title_justify="left")
    t.add_column("record", overflow="fold")
    for c in (
        "set",
        "alloc meas",
        "alloc err",
        "reserved meas",
        "res err",
        "device meas",
        "dev err",
        "static err",
        "optim err",
        "fit?",
        "tok/s meas",
        "tok/s err",
        "MFU",
        "HFU",
    ):
        t.add_column(c, justify="left" if c == "set" else "right")
    for x in rows:
        m, tp = x.measured, x.throughput
        fit = (
            "-" if x.fits_predicted is None else ("FALSE FIT" if x.false_fit else ("yes" if x.fits_predicted else "no"))
        )
        t.add_row(
            x.record.id,
            "held-out" if x.held_out else "fitted",
            _gib_or_dash(m["peak_allocated_bytes"]),
            _pct(x.error("peak_allocated_bytes")),
            _gib_or_dash(m["peak_reserved_bytes"]),
            _pct(x.error("peak_reserved_bytes")),
            _gib_or_dash(m["peak_device_bytes"]),
            _pct(x.error("peak_device_bytes")),
            _pct(x.error("static_after_load_bytes")),
            _pct(x.error("optimizer_state_bytes")),
            fit,
            f"{tp['tokens_per_sec']:,.0f}" if tp.get("tokens_per_sec") else "-",
            _pct(tp.get("error")),
            f"{tp['mfu']:.0%}" if tp.get("mfu") is not None else "-",
            f"{tp['hfu']:.0%}" if tp.get("hfu") is not None else "-",
        )
    console.print(t)
    s = Table(title="summary (absolute errors)", title_justify="left")
    for c in (
        "set",
        "n",
        "device median",
        "device worst",
        "allocated median",
        "allocated worst",
        "false fits",
        "tok/s median",
        "tok/s worst",
        "steps >= 1 s",
    ):
        s.add_column(c, justify="left" if c == "set" else "right")
    for name, sm in summaries.items():
        if not sm.n:
            continue
        med, worst = sm.median_abs_error, sm.worst_abs_error

        def f(d, k):
            return f"{d[k]:.1%}" if k in d else "-"

        s.add_row(
            name,
            str(sm.n),
            f(med, "peak_device_bytes"),
            f(worst, "peak_device_bytes"),
            f(med, "peak_allocated_bytes"),
            f(worst, "peak_allocated_bytes"),
            str(sm.false_fits),
            f(med, "tokens_per_sec"),
            f(worst, "tokens_per_sec"),
            str(sm.long_step_records),
        )
    console.print(s)


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
    t = Table(title=f"changes against the baseline ({cmp.gpu})", title_justify="left")
    t.add_column("configuration", overflow="fold")
    for name in short.values():
        t.add_column(name, justify="right")
    t.add_column("status")
    for config, metrics in by_config.items():
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
        t.add_row(config, *cells, f"[{st}]{worst}[/{st}]")
    console.print(t)
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

    t = Table()
    t.add_column("GiB")
    for m in d["modes"]:
        t.add_column(MODE_LABELS[m["mode"]], justify="right")
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
        t.add_row(names.get(k, k), *(_g(m["components"].get(k, 0)) for m in d["modes"]))
    t.add_section()
    t.add_row("[bold]device peak[/bold]", *(f"[bold]{_g(m['peak_device_bytes'])}[/bold]" for m in d["modes"]))
    t.add_row("fits", *(("[green]yes[/green]" if m["fits"] else "[red]no[/red]") for m in d["modes"]))
    t.add_row("largest batch", *(str(m["max_batch"]) for m in d["modes"]))
    console.print(t)
    a, mg = d["adapter"], d["merge"]
    console.print(
        f"adapter: {a['params'] / 1e6:,.1f} M parameters, {_g(a['memory_bytes'])} GiB in memory (fp32), "
        f"{a['file_bytes'] / 1e6:,.0f} MB on disk"
    )
    console.print(
        f"merge (16-bit base + adapter, merge_and_unload): peak {_g(mg['peak_bytes'])} GiB -> "
        f"{mg['path']}; merged checkpoint {mg['merged_file_bytes'] / 1e9:,.1f} GB"
    )
    for n in d["modes"][0]["notes"]:
        console.print(f"[dim]note:[/dim] {n}")


def infer_records(recs: list[dict], spec) -> None:
    """Measured serving modes next to the estimator's memory for the same mode."""
    from .estimate.inference import InferSettings, estimate_inference
    from .settings import Settings

    t = Table(title=f"serving {spec.name}", title_justify="left")
    t.add_column("mode")
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
    for n in (recs[0].get("notes") or []) if recs else []:
        console.print(f"[dim]note:[/dim] {n}")
