"""Figures for the report (matplotlib, Agg, no timestamps in the PNGs: same inputs, same bytes)."""

from __future__ import annotations

import io

from ..units import GiB

STACKS = (
    "weights + adapters (after load)",
    "optimizer states",
    "activations + transients",
    "allocator cache",
    "CUDA context + libraries",
)
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")


def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "qlora-bench", "font.size": 12, "figure.dpi": 100})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    _fig().close(fig)
    return buf.getvalue()


def breakdown(series: list[dict]) -> bytes:
    """Stacked bars per configuration: estimated (left) and measured (right) memory in the same five parts."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(series) + 1.5))
    for i, row in enumerate(series):
        for j, (kind, offset) in enumerate((("estimated", -0.2), ("measured", 0.2))):
            left = 0.0
            for k, v in enumerate(row[kind]):
                ax.barh(
                    i + offset,
                    v / GiB,
                    left=left,
                    height=0.38,
                    color=COLORS[k],
                    hatch="//" if kind == "measured" else None,
                    edgecolor="white",
                    label=STACKS[k] if (i == 0 and j == 0) else None,
                )
                left += v / GiB
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels([r["label"] for r in series])
    ax.invert_yaxis()
    ax.set_xlabel("GiB (upper bar: estimated; lower, hatched: measured)")
    ax.set_title("Peak device memory by part")
    ax.legend(loc="lower right", fontsize=10)
    return _png(fig)


# One look per method in every figure: colour and marker, so points stay distinguishable in grey print too.
METHOD_STYLE = {"full": ("#1f77b4", "s"), "lora": ("#ff7f0e", "o"), "qlora": ("#2ca02c", "^")}
# The accuracy targets (device peak within 5 % median, 10 % worst), shaded as bands around "exact".
BANDS = ((0.10, "#fdd9b5", "within ±10 %"), (0.05, "#b7e4b0", "within ±5 %"))


def _short(record_id: str) -> str:
    return record_id.replace("/adamw_torch_fused", "").replace("/paged_adamw_8bit", "")


def predicted_vs_measured(rows) -> bytes:
    """Left: predicted against measured device peak on log axes, where a ±x % band has the same width everywhere
    (on linear axes it vanishes near the origin). Right: the error itself, so the bands are wide horizontal strips
    and the configurations that miss the 10 % target are named."""
    plt = _fig()
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 6.5))
    pts = [
        (
            x.measured["peak_device_bytes"] / GiB,
            x.predicted["peak_device_bytes"] / GiB,
            x.record.settings.method,
            x.held_out,
            _short(x.record.id),
        )
        for x in rows
    ]
    lo = min(min(p[0], p[1]) for p in pts) / 1.25
    hi = max(max(p[0], p[1]) for p in pts) * 1.25
    xs = [lo, hi]
    worst = max(abs(p[1] / p[0] - 1) for p in pts)
    ylim = max(15.0, 100 * worst * 1.25)
    for band, color, label in BANDS:
        a.fill_between(xs, [v * (1 - band) for v in xs], [v * (1 + band) for v in xs], color=color, label=label)
        b.axhspan(-100 * band, 100 * band, color=color, label=label)
    a.plot(xs, xs, color="black", linewidth=1, label="exact")
    b.axhline(0, color="black", linewidth=1, label="exact")
    for method, (color, marker) in METHOD_STYLE.items():
        for held in (False, True):
            sel = [p for p in pts if p[2] == method and p[3] == held]
            if not sel:
                continue
            style = dict(
                marker=marker, s=70, edgecolors=color, linewidths=1.5, facecolors="white" if held else color, zorder=3
            )
            label = f"{method}{' (held out)' if held else ''}"
            a.scatter([p[0] for p in sel], [p[1] for p in sel], label=label, **style)
            b.scatter([p[0] for p in sel], [100 * (p[1] / p[0] - 1) for p in sel], label=label, **style)
    for m, pr, _, _, name in pts:
        if abs(pr / m - 1) > 0.10:
            b.annotate(name, (m, 100 * (pr / m - 1)), xytext=(6, 4), textcoords="offset points", fontsize=9)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlim(lo, hi)
    a.set_ylim(lo, hi)
    b.set_xscale("log")
    b.set_xlim(lo, hi)
    b.set_ylim(-ylim, ylim)
    for ax in (a, b):
        ax.xaxis.set_major_formatter(_plain_ticks())
        ax.xaxis.set_minor_formatter(_plain_ticks())
        ax.set_xlabel("measured device peak (GiB, log scale)")
        ax.grid(True, which="both", color="#dddddd", linewidth=0.6)
    a.yaxis.set_major_formatter(_plain_ticks())
    a.yaxis.set_minor_formatter(_plain_ticks())
    a.set_ylabel("predicted device peak (GiB, log scale)")
    a.set_title("Predicted vs measured peak device memory")
    b.set_ylabel("error: predicted / measured - 1 (%)")
    b.set_title("Prediction error per configuration")
    # one legend for both panels, below them, where it hides no point
    fig.subplots_adjust(bottom=0.2)
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=5, frameon=False)
    return _png(fig)


def _plain_ticks():
    """Log-axis ticks as plain numbers (10, 20, 50) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "1235" else "")


def _thousands():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:,.0f}")


def throughput_scatter(rows, band: float) -> bytes:
    """Predicted against measured tokens/s (log axes), one marker per record; the dashed lines are the step-time
    model's band (its worst leave-one-out error), hollow markers the steps under 0.5 s (the noisiest)."""
    plt = _fig()
    sel = [x for x in rows if x.throughput.get("tokens_per_sec") and x.throughput.get("tokens_per_sec_predicted")]
    fig, a = plt.subplots(figsize=(8, 7))
    lo = min(min(x.throughput["tokens_per_sec"], x.throughput["tokens_per_sec_predicted"]) for x in sel) / 1.5
    hi = max(max(x.throughput["tokens_per_sec"], x.throughput["tokens_per_sec_predicted"]) for x in sel) * 1.5
    a.plot([lo, hi], [lo, hi], color="#444444", linewidth=1, label="predicted = measured")
    for k in (1 + band, 1 / (1 + band)):
        a.plot([lo, hi], [lo * k, hi * k], color="#888888", linewidth=1, linestyle="--")
    for method, (color, marker) in METHOD_STYLE.items():
        for long in (True, False):
            pts = [
                (x.throughput["tokens_per_sec"], x.throughput["tokens_per_sec_predicted"])
                for x in sel
                if x.record.settings.method == method and ((x.throughput.get("step_seconds") or 0) >= 0.5) == long
            ]
            if pts:
                a.scatter(
                    [p[0] for p in pts], [p[1] for p in pts], marker=marker, s=60,
                    color=color if long else "none", edgecolors=color,
                    label=f"{method}" + ("" if long else " (step < 0.5 s)"),
                )  # fmt: skip
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlim(lo, hi)
    a.set_ylim(lo, hi)
    a.xaxis.set_major_formatter(_thousands())
    a.yaxis.set_major_formatter(_thousands())
    a.set_xlabel("measured tokens/s")
    a.set_ylabel("predicted tokens/s")
    a.set_title(f"Step-time model vs measured runs (dashed: ±{band:.0%}, its worst left-out error)")
    a.grid(True, color="#dddddd", linewidth=0.6)
    a.legend(fontsize=8)
    return _png(fig)


def throughput(rows) -> bytes:
    """Left: tokens/s measured and predicted per configuration, with MFU. Right: tokens/s against peak memory,
    one panel per model, since a 1B and an 8B model differ several-fold on both axes and would hide each other."""
    plt = _fig()
    sel = sorted((x for x in rows if x.throughput.get("tokens_per_sec")), key=lambda x: x.record.id)
    models = sorted({x.record.model for x in sel if x.has_memory})  # the trade-off needs the memory
    fig = plt.figure(figsize=(18, max(0.5 * len(sel) + 2.5, 4.5 * len(models))))
    grid = fig.add_gridspec(len(models), 2, width_ratios=[1.3, 1], wspace=0.2, hspace=0.4)
    a = fig.add_subplot(grid[:, 0])
    tps = [x.throughput["tokens_per_sec"] for x in sel]
    pred = [x.throughput.get("tokens_per_sec_predicted") or 0 for x in sel]
    y = range(len(sel))
    a.barh([i - 0.2 for i in y], tps, height=0.38, label="measured", color="#4C72B0")
    a.barh([i + 0.2 for i in y], pred, height=0.38, label="predicted", color="#DD8452")
    for i, x in enumerate(sel):
        a.text(tps[i], i - 0.2, f" MFU {x.throughput['mfu']:.0%}", va="center", fontsize=9)
    a.set_yticks(list(y))
    a.set_yticklabels([_short(x.record.id) for x in sel])
    a.invert_yaxis()
    a.set_xlim(0, max(tps + pred) * 1.12)  # room for the MFU labels
    a.xaxis.set_major_formatter(_thousands())
    a.set_xlabel("throughput (tokens/s)")
    a.set_title("Throughput per configuration (H100)")
    a.legend(loc="lower right")
    for k, model in enumerate(models):
        b = fig.add_subplot(grid[k, 1])
        for method, (color, marker) in METHOD_STYLE.items():
            pts = [
                (x.measured["peak_device_bytes"] / GiB, x.throughput["tokens_per_sec"])
                for x in sel
                if x.record.model == model and x.record.settings.method == method and x.has_memory
            ]
            if pts:
                b.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, s=70, label=method)
        b.margins(0.12)
        b.yaxis.set_major_formatter(_thousands())
        b.set_xlabel("peak device memory (GiB)")
        b.set_ylabel("throughput (tokens/s)")
        b.set_title(f"Memory / throughput trade-off: {model}")
        b.grid(True, color="#dddddd", linewidth=0.6)
        b.legend(title="method")
    return _png(fig)
