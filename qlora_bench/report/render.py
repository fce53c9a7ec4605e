"""Write the report: Markdown (README.md + PNGs) and one self-contained HTML file with the plots embedded."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from ..results import REPO_ROOT, load_records
from . import plots
from .claims import claims
from .data import FEASIBILITY_GPUS, collect, infer_measured_table

TARGETS = (
    ("device peak, median absolute error", "peak_device_bytes", "median", 0.05),
    ("device peak, worst absolute error", "peak_device_bytes", "worst", 0.10),
)


def _rel(p: Path) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else p.name


# A numeric cell: a number with an optional sign, thousands commas and unit ("+3.3%", "6,742", "1.2 B").
NUMBER = re.compile(r"[+-]?\d[\d,]*(\.\d+)?\s?(%|GiB|GB|B|ms|s)?")


def numeric_columns(rows: list[dict]) -> set[str]:
    """Columns whose every cell is a number or "-": right-aligned in both formats, everything else left-aligned.
    Decided from the content, so no table has to declare its column kinds."""
    cols = list(rows[0]) if rows else []
    out = set()
    for c in cols:
        cells = [str(r[c]) for r in rows if str(r[c]) != "-"]
        if cells and all(NUMBER.fullmatch(v) for v in cells):
            out.add(c)
    return out


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    cols, num = list(rows[0]), numeric_columns(rows)

    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in num else ":---" for c in cols) + "|"]
    out += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>(none)</em></p>"
    cols, num = list(rows[0]), numeric_columns(rows)
    cls = {c: ' class="num"' if c in num else "" for c in cols}
    head = "".join(f"<th{cls[c]}>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td{cls[c]}>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _targets(validation) -> list[dict]:
    rows = validation["rows"]
    from ..validate import summarize

    s = summarize(rows)
    out = []
    for label, key, which, limit in TARGETS:
        v = (s.median_abs_error if which == "median" else s.worst_abs_error).get(key)
        out.append(
            {
                "target": f"{label} <= {limit:.0%}",
                "measured": f"{v:.1%}" if v is not None else "-",
                "met": "yes" if v is not None and v <= limit else "no",
            }
        )
    out.append({"target": "false fits = 0", "measured": str(s.false_fits), "met": "yes" if not s.false_fits else "no"})
    long = s.worst_abs_error.get("tokens_per_sec_long_steps")
    out.append(
        {
            "target": "tokens/s within 15% for steps >= 1 s",
            "measured": f"{long:.1%}" if long is not None else "-",  # "-", not words, keeps the column numeric
            "met": "untested (no steps >= 1 s measured)" if long is None else ("yes" if long <= 0.15 else "no"),
        }
    )
    return out


def build_report(inputs: list[Path], out_dir: Path) -> list[Path]:
    def gpu_only(rs):  # CPU smoke runs carry no GPU figures: nothing to report
        return [
            r
            for r in rs
            if r.measured.get("peak_device_bytes")
            or r.data.get("outcome") == "oom"
            or ((r.data.get("environment") or {}).get("gpu_name") and r.measured.get("tokens_per_sec"))
        ]

    records = gpu_only(r for p in inputs for r in load_records(p, kind="train"))
    infer_records = gpu_only(r for p in inputs for r in load_records(p, kind="infer"))
    data = collect(records)
    if not data["rows"]:
        from ..errors import InputError

        raise InputError(f"no GPU records in {', '.join(map(str, inputs))}: nothing to report")
    figures = {
        "predicted-vs-measured.png": (
            "Predicted vs measured peak device memory (log axes) and the error per configuration; the shaded bands "
            "are ±5 % and ±10 %, hollow markers are held-out records.",
            plots.predicted_vs_measured(data["memory_rows"]),
        ),
        "memory-breakdown.png": (
            "Peak device memory by part, estimated (plain) and measured (hatched).",
            plots.breakdown(data["breakdown"]),
        ),
        "throughput.png": (
            "Tokens/s measured and predicted with MFU, and tokens/s against peak memory, one panel per model.",
            plots.throughput(data["rows"]),
        ),
        "step-time.png": (
            "Predicted against measured tokens/s for every record (the step-time model: kernels priced and queued, "
            "constants fitted per GPU by `qlora-bench calibrate`); dashed: its band.",
            plots.throughput_scatter(data["rows"], data["step_time_band"]),
        ),
    }
    sections = [
        ("Accuracy against the targets", _targets(data), None),
        ("Summary of errors (fitted vs held-out records)", data["summary"], None),
        ("Predicted vs measured", data["errors"], "predicted-vs-measured.png"),
        ("Memory breakdown per configuration", None, "memory-breakdown.png"),
        ("Throughput, MFU and the memory / throughput trade-off", None, "throughput.png"),
        ("Step time: predicted vs measured", data["step_time"], "step-time.png"),
        ("Feasibility matrix (estimator)", data["feasibility"], None),
        ("Serving after fine-tuning (estimator)", data["inference"], None),
        (
            "Serving, measured (infer-bench)",
            [r for r in infer_measured_table(infer_records) if r["peak GiB"] != "-"],
            None,
        ),
        # the verdict sentence leads with the status, so the status column would only repeat it; claims compare
        # like with like, so they read the full records (memory and throughput), not the throughput-only ones
        (
            "What the guides claim",
            [
                {k: v for k, v in c.items() if k != "status"}
                for c in claims([x.record for x in data["memory_rows"]], infer_records)
            ],
            None,
        ),
        ("Calibration constants (fitted by `qlora-bench calibrate`)", data["calibration"], None),
        ("Where the measurements come from", data["environment"], None),
    ]
    notes = {
        "Feasibility matrix (estimator)": (
            "Largest micro-batch at 2048 tokens that fits, per method: F = full (fused AdamW), L = LoRA r=16 (fused "
            "AdamW), Q = QLoRA r=16 (NF4 + double quant, paged 8-bit AdamW), all with gradient checkpointing; `-` "
            f"means it does not fit even at batch 1. GPUs: {', '.join(FEASIBILITY_GPUS)}."
        ),
        "Serving after fine-tuning (estimator)": (
            "Device memory of each serving mode for Llama-3.1-8B with an r=16 all-linear adapter, batch 1 x 4,096 "
            "tokens of KV cache (prefill 2,048), and the largest batch that fits; the merge column is the peak of "
            "merge_and_unload on a 16-bit base and where it fits. `qlora-bench infer` gives this for any model."
        ),
        "Serving, measured (infer-bench)": (
            "GPU runs of `qlora-bench infer-bench` (none committed yet: the table fills in when they are)."
        ),
        "Predicted vs measured": (
            "Errors are predicted / measured - 1. `static` compares memory after load and adapter wrap with the "
            "estimator's weights + quantization constants + adapters. MFU counts useful FLOPs, HFU adds "
            "recomputation, both against the GPU's dense bf16 peak."
        ),
    }
    inputs_md = ", ".join(f"`{_rel(p)}`" for p in inputs)
    title = "qlora-bench report"
    intro = (
        f"Generated by `qlora-bench report` from {len(records)} GPU records in {inputs_md}. "
        "Regenerate with the same command; the output is byte-for-byte the same for the same inputs."
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}\n\n", intro + "\n"]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for heading, rows, fig in sections:
        md.append(f"\n## {heading}\n\n")
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if heading in notes:
            md.append(notes[heading] + "\n")
            body.append(f"<p>{html.escape(notes[heading])}</p>")
        if fig:
            caption, png = figures[fig]
            md.append(f"\n![{caption}]({fig})\n")
            b64 = base64.b64encode(png).decode()
            body.append(
                f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        if rows is not None:
            md.append("\n" + md_table(rows))
            body.append(html_table(rows))
    written = []
    for name, (_, png) in figures.items():
        (out_dir / name).write_bytes(png)
        written.append(out_dir / name)
    (out_dir / "README.md").write_text("".join(m if m.endswith("\n") else m + "\n" for m in md))
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:left}th{background:#f3f3f3}.num{text-align:right}"
        "img{max-width:100%}figcaption{font-size:12px;color:#555}"
    )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
    (out_dir / "report.html").write_text(page)
    written += [out_dir / "README.md", out_dir / "report.html"]
    return written
