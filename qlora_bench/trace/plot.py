"""Memory over the traced program: live bytes stacked by category, the simulated allocated and reserved lines, and
the phase boundaries (matplotlib, imported only here; Agg; no timestamp in the PNG: same trace, same bytes)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..units import GiB
from . import CATEGORIES, CATEGORY_LABELS, TraceResult

COLORS = {
    "parameters": "#4C72B0",
    "quant_state": "#64B5CD",
    "inputs": "#CCB974",
    "load": "#937860",
    "activations": "#55A868",
    "gradients": "#C44E52",
    "optimizer_states": "#DD8452",
    "temporaries": "#8172B3",
    "workspaces": "#DA8BC3",
}


def need_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install 'qlora-bench[report]'")


def plot_memory(r: TraceResult, path: str | Path) -> Path:
    need_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.5))
    x = [p[0] for p in r.tag_timeline]
    stacks = [p[1] for p in r.tag_timeline]
    present = [c for c in CATEGORIES if any(t.get(c) for t in stacks)]
    if present:
        ax.stackplot(
            x,
            [[t.get(c, 0) / GiB for t in stacks] for c in present],
            labels=[CATEGORY_LABELS[c] for c in present],
            colors=[COLORS[c] for c in present],
            alpha=0.85,
        )
    ax.plot(x, [sum(t.values()) / GiB for t in stacks], color="black", lw=1.0, label="allocated (live tensors)")
    ax.plot(
        [p[0] for p in r.timeline],
        [p[2] / GiB for p in r.timeline],
        color="black",
        lw=1.2,
        ls="--",
        label="reserved (allocator model)",
        drawstyle="steps-post",
    )
    top = max([p[2] for p in r.timeline] or [0]) / GiB
    for i, name in r.phases:
        if name == "end" or name.startswith("zero"):  # zero_grad frees only, right after opt: no room for a label
            continue
        ax.axvline(i, color="grey", lw=0.6, ls=":")
        ax.text(i, top * 1.01, name, rotation=90, va="bottom", ha="center", fontsize=8, color="dimgrey")
    s = r.settings
    ax.set_title(f"{r.model} · {s.describe()} · {r.steps} traced step{'s' * (r.steps > 1)}", pad=38)
    ax.set_xlabel("allocation event")
    ax.set_ylabel("GiB")
    ax.set_ylim(0, top * 1.12 if top else 1)
    ax.set_xlim(0, max(x or [1]))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=4, frameon=False)
    path = Path(path)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path
