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

    plt.rcParams.update({"svg.hashsalt": "qlora-bench", "font.size": 9, "figure.dpi": 100})
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
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def predicted_vs_measured(rows) -> bytes:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    pts = [
        (
            x.measured["peak_device_bytes"] / GiB,
            x.predicted["peak_device_bytes"] / GiB,
            x.record.settings.method,
            x.held_out,
        )
        for x in rows
    ]
    hi = max(max(p[0], p[1]) for p in pts) * 1.08
    ax.plot([0, hi], [0, hi], color="black", linewidth=0.8, label="exact")
    for band, alpha in ((0.10, 0.08), (0.05, 0.15)):
        ax.fill_between(
            [0, hi], [0, hi * (1 - band)], [0, hi * (1 + band)], color="gray", alpha=alpha, label=f"±{band:.0%}"
        )
    marks = {"full": "s", "lora": "o", "qlora": "^"}
    colors = {"full": "C0", "lora": "C1", "qlora": "C2"}
    for method in ("full", "lora", "qlora"):
        for held in (False, True):
            sel = [p for p in pts if p[2] == method and p[3] == held]
            if sel:
                c = colors[method]
                ax.scatter(
                    [p[0] for p in sel],
                    [p[1] for p in sel],
                    marker=marks[method],
                    facecolors="none" if held else c,
                    edgecolors=c,
                    label=f"{method}{' (held out)' if held else ''}",
                )
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("measured device peak (GiB)")
    ax.set_ylabel("predicted device peak (GiB)")
    ax.set_title("Predicted vs measured peak memory")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def throughput(rows) -> bytes:
    """Tokens/s and MFU per configuration, and tokens/s against peak memory."""
    plt = _fig()
    sel = sorted((x for x in rows if x.throughput.get("tokens_per_sec")), key=lambda x: x.record.id)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.45 * len(sel) + 2), gridspec_kw={"width_ratios": [1.4, 1]})
    labels = [x.record.id.replace("/adamw_torch_fused", "").replace("/paged_adamw_8bit", "") for x in sel]
    tps = [x.throughput["tokens_per_sec"] for x in sel]
    pred = [x.throughput.get("tokens_per_sec_predicted") or 0 for x in sel]
    y = range(len(sel))
    a.barh([i - 0.2 for i in y], tps, height=0.38, label="measured", color="#4C72B0")
    a.barh([i + 0.2 for i in y], pred, height=0.38, label="predicted", color="#DD8452")
    for i, x in enumerate(sel):
        a.text(tps[i], i - 0.2, f" MFU {x.throughput['mfu']:.0%}", va="center", fontsize=7)
    a.set_yticks(list(y))
    a.set_yticklabels(labels)
    a.invert_yaxis()
    a.set_xlabel("tokens/s")
    a.set_title("Throughput per configuration (H100)")
    a.legend(fontsize=8, loc="lower right")
    marks = {"full": "s", "lora": "o", "qlora": "^"}
    for method in ("full", "lora", "qlora"):
        pts = [
            (x.measured["peak_device_bytes"] / GiB, x.throughput["tokens_per_sec"])
            for x in sel
            if x.record.settings.method == method
        ]
        if pts:
            b.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marks[method], label=method)
    b.set_xlabel("peak device memory (GiB)")
    b.set_ylabel("tokens/s")
    b.set_title("Memory / throughput trade-off")
    b.legend(fontsize=8)
    return _png(fig)
