"""The analytic estimator against `trace` on a grid of configurations, without a GPU (`qlora-bench crosscheck`).

Two independent accountings of one training step: the estimator's allocation program (estimate/program.py,
written from the libraries' code) and `trace` (the libraries themselves, run on fake CUDA tensors). Both are
replayed through the same caching-allocator model, so where they differ it is the events that differ, and
autograd's saved tensors on CPU (tests/test_activations_saved.py) say which side keeps the right tensors.

The full grid (every supported family x full / LoRA / QLoRA x checkpointing on / off x sdpa / eager x three
token counts, plus the double-quantization and fp32-upcast variants of QLoRA) runs in `nox -s crosscheck` and
is committed as results/crosscheck/grid.json (one JSON document, not a .jsonl of run records: `results` and
`validate` read measurements only) with its summary table grid.md; CI runs the `smoke` grid.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, read_json_object, write_text
from .profiles import resolve_model
from .settings import DEFAULT_OPTIMIZER, Settings

# The issue's targets for analytic vs trace
ALLOCATED_TOLERANCE = 0.01
RESERVED_TOLERANCE = 0.03

# Real-size architectures, one per supported family (the trace costs seconds per step, not memory)
FAMILIES = ("llama-3.2-1b", "qwen2.5-0.5b", "mistral-7b", "phi-3-mini", "gemma-2-9b", "mixtral-8x7b")
SIZES = ((1, 512), (2, 1024), (1, 4096))


@dataclass(frozen=True)
class Case:
    model: str
    settings: Settings

    @property
    def id(self) -> str:
        return f"{self.model} {self.settings.describe()}" + ("" if self.settings.upcast_non_quantized else " no-upcast")


def _settings(method: str, **kw) -> Settings:
    return Settings(method=method, optimizer=DEFAULT_OPTIMIZER[method], **kw)


def _attn(model: str) -> dict:
    """transformers 5.23 refuses sdpa for Gemma-2 (it cannot apply the logit softcapping), and the trace runs
    flash_attention_2 through sdpa's flash kernel, which refuses it too: Gemma-2 is checked with eager."""
    return {"attn": "eager"} if resolve_model(model).model_type == "gemma2" else {}


def _moe_dropout(model: str, method: str) -> dict:
    """peft 0.21 refuses LoRA dropout on fused MoE experts (lora.ParamWrapper): MoE adapter cases use dropout 0.
    And QLoRA's fp32 upcast of the (unquantized) experts breaks transformers 5.23's grouped_mm on sm80+ ("Expected
    inputs of BF16 type"): MoE QLoRA cases keep them 16-bit."""
    if method == "full" or not resolve_model(model).is_moe:
        return {}
    return {"dropout": 0.0} | ({"upcast_non_quantized": False} if method == "qlora" else {})


def record_cases() -> list[Case]:
    """The configurations of the committed GPU records with memory peaks (one case per distinct configuration)."""
    from .results import committed_results_dir, load_records

    cases = {}
    for r in load_records(committed_results_dir(), kind="train"):
        if r.ok and r.measured.get("peak_reserved_bytes"):
            c = Case(r.model, r.settings)
            cases.setdefault(c.id, c)
    return list(cases.values())


def with_measured(row: dict) -> dict:
    """A records-grid row with the H100 measurements of its configuration (every record of it)."""
    from .results import committed_results_dir, load_records

    measured = [
        {k: r.measured[k] for k in ("peak_allocated_bytes", "peak_reserved_bytes")} | {"id": r.id}
        for r in load_records(committed_results_dir(), kind="train")
        if r.ok and r.measured.get("peak_reserved_bytes") and Case(r.model, r.settings).id == row["case"]
    ]
    return {**row, "measured": measured}


def grid(name: str = "full") -> list[Case]:
    """`smoke`: four cheap cases for CI; `full`: the committed grid (>= 200 cases); `records`: the committed GPU
    records' configurations (trace and estimator against the measurements)."""
    if name == "records":
        return record_cases()
    if name == "smoke":
        return [
            Case("qwen2.5-0.5b", _settings("qlora", seq=256)),
            Case("qwen2.5-0.5b", _settings("lora", seq=256, gradient_checkpointing=False)),
            Case("llama-3.2-1b", _settings("full", seq=256, attn="eager")),
            Case("llama-3.2-1b", _settings("qlora", seq=256, double_quant=False, upcast_non_quantized=False)),
        ]
    if name != "full":
        raise InputError(f"grid {name!r}: expected smoke, full or records")
    cases = []
    for model, method, gc, attn, (b, s) in itertools.product(
        FAMILIES, ("qlora", "lora", "full"), (True, False), ("sdpa", "eager"), SIZES
    ):
        attn = _attn(model).get("attn", attn) if attn == "sdpa" else attn
        kw = _moe_dropout(model, method)
        cases.append(Case(model, _settings(method, gradient_checkpointing=gc, attn=attn, batch=b, seq=s, **kw)))
    for model, (b, s) in itertools.product(FAMILIES, SIZES[:2]):  # QLoRA variants
        kw = _moe_dropout(model, "qlora") | _attn(model)
        cases.append(Case(model, _settings("qlora", batch=b, seq=s, **{"double_quant": False, **kw})))
        cases.append(Case(model, _settings("qlora", batch=b, seq=s, **{"upcast_non_quantized": False, **kw})))
    for model, method in itertools.product(FAMILIES, ("lora", "full")):  # fp32 compute: SDPA's kernel changes
        if resolve_model(model).is_moe:  # grouped_mm refuses fp32 experts (plan says so)
            continue
        kw = _attn(model)  # (grouped-query heads: math; others: memory-efficient)
        cases.append(Case(model, _settings(method, batch=2, seq=1024, compute_dtype="fp32", **kw)))
    return list({c.id: c for c in cases}.values())  # (MoE QLoRA is no-upcast already: one case, not two)


def check(case: Case, steps: int = 2) -> dict:
    """One row: both peaks from both sides, their relative differences, the trace's cost."""
    from .trace import TraceFailed, trace

    row = {"case": case.id, "model": case.model, "settings": case.settings.to_dict()}
    t0 = time.perf_counter()
    try:
        r = trace(resolve_model(case.model), case.settings, steps=steps)
    except (TraceFailed, InputError) as err:
        return with_analytic({**row, "trace": None, "error": str(err).splitlines()[0][:300]}, case)
    row["trace"] = {"allocated": r.peak_allocated_bytes, "reserved": r.peak_reserved_bytes}
    row["trace_seconds"] = round(time.perf_counter() - t0, 2)
    row["versions"] = getattr(r, "versions", None)
    return with_analytic(row, case)


def with_analytic(row: dict, case: Case) -> dict:
    """The analytic side of a row (milliseconds: recomputed on every run, so the committed table follows the
    estimator while the traces, which take seconds each, are kept)."""
    from .estimate import estimate

    e = estimate(resolve_model(case.model), case.settings)
    row = {**row, "analytic": {"allocated": e.peak_allocated_bytes, "reserved": e.peak_reserved_bytes}}
    t = row.get("trace")
    if t:
        row["allocated_diff"] = round(e.peak_allocated_bytes / t["allocated"] - 1, 5)
        row["reserved_diff"] = round(e.peak_reserved_bytes / t["reserved"] - 1, 5)
        row["within"] = (
            abs(row["allocated_diff"]) <= ALLOCATED_TOLERANCE and abs(row["reserved_diff"]) <= RESERVED_TOLERANCE
        )
    return row


def read_rows(path: Path) -> list[dict]:
    """The rows of a crosscheck file (nothing when it does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    doc = read_json_object(path, "crosscheck file")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("case"), str) for r in rows):
        raise InputError(f"{path}: field 'rows' must be a list of rows with a 'case'; rerun `qlora-bench crosscheck`")
    return rows


def _write(out: Path, rows: list[dict], grid_name: str) -> None:
    doc = {
        "generated_by": "qlora-bench crosscheck",
        "grid": grid_name,
        "targets": {"allocated": ALLOCATED_TOLERANCE, "reserved": RESERVED_TOLERANCE},
        "summary": summary(rows),
        "rows": rows,
    }
    write_text(out, json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n", "crosscheck file")


def run(cases: list[Case], out: Path, jobs: int = 1, progress=None, grid_name: str = "full") -> list[dict]:
    """Check every case (`jobs` traces at once: each is its own process), write the rows (one JSON document) and a
    Markdown summary next to them; traced rows already in `out` are kept (a rerun resumes, and refreshes the
    analytic side)."""
    out = Path(out)
    done = {row["case"]: row for row in read_rows(out)}
    by_id = {c.id: c for c in cases}
    rows = {k: with_analytic(v, by_id[k]) for k, v in done.items() if k in by_id and v.get("trace")}
    todo = [c for c in cases if c.id not in rows]  # untraced or failed rows are traced again

    def one(c: Case) -> dict:
        row = check(c, steps=3 if grid_name == "records" else 2)
        if grid_name == "records":
            row = with_measured(row)
        if progress:
            progress(row)
        return row

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for row in pool.map(one, todo):
            rows[row["case"]] = row
            _write(out, [rows[c.id] for c in cases if c.id in rows], grid_name)  # a stopped run keeps its rows
    ordered = [rows[c.id] for c in cases if c.id in rows]
    _write(out, ordered, grid_name)
    write_text(out.with_suffix(".md"), summary_markdown(ordered), "crosscheck summary")
    return ordered


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("trace")]
    if not ok:
        return {"n": len(rows), "traced": 0}
    a = [abs(r["allocated_diff"]) for r in ok]
    res = [abs(r["reserved_diff"]) for r in ok]
    return {
        "n": len(rows),
        "traced": len(ok),
        "failed": len(rows) - len(ok),
        "within_targets": sum(r["within"] for r in ok),
        "allocated_median": statistics.median(a),
        "allocated_worst": max(a),
        "reserved_median": statistics.median(res),
        "reserved_worst": max(res),
    }


def summary_markdown(rows: list[dict]) -> str:
    s = summary(rows)
    lines = [
        "# Analytic estimator vs `trace` (no GPU)",
        "",
        f"{s.get('traced', 0)} of {s['n']} configurations traced; targets: allocated within "
        f"{ALLOCATED_TOLERANCE:.0%}, reserved within {RESERVED_TOLERANCE:.0%}.",
    ]
    if s.get("traced"):
        lines += [
            f"Within both targets: {s['within_targets']} of {s['traced']}. Allocated: median "
            f"{s['allocated_median']:.2%}, worst {s['allocated_worst']:.2%}. Reserved: median "
            f"{s['reserved_median']:.2%}, worst {s['reserved_worst']:.2%}.",
            "",
            "| configuration | analytic alloc GiB | trace alloc GiB | diff | analytic reserved GiB | trace reserved GiB"
            " | diff |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in sorted(rows, key=lambda r: -abs(r.get("reserved_diff") or 0)):
            if not r.get("trace"):
                continue
            g = 2**30
            lines.append(
                f"| {r['case']} | {r['analytic']['allocated'] / g:.2f} | {r['trace']['allocated'] / g:.2f} | "
                f"{r['allocated_diff']:+.2%} | {r['analytic']['reserved'] / g:.2f} | {r['trace']['reserved'] / g:.2f}"
                f" | {r['reserved_diff']:+.2%} |"
            )
    measured = [r for r in rows if r.get("measured") and r.get("trace")]
    if measured:
        lines += [
            "",
            "## Against the measured runs (peak / measured - 1; every record of the configuration)",
            "",
            "| configuration | record | trace allocated | trace reserved | analytic allocated | analytic reserved |",
            "|---|---|--:|--:|--:|--:|",
        ]
        for r in measured:
            for m in r["measured"]:
                a, res = m["peak_allocated_bytes"], m["peak_reserved_bytes"]
                lines.append(
                    f"| {r['case']} | {m['id']} | {r['trace']['allocated'] / a - 1:+.2%} | "
                    f"{r['trace']['reserved'] / res - 1:+.2%} | {r['analytic']['allocated'] / a - 1:+.2%} | "
                    f"{r['analytic']['reserved'] / res - 1:+.2%} |"
                )
    failed = [r for r in rows if not r.get("trace")]
    if failed:
        lines += ["", "Not traced:", ""] + [f"- {r['case']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"
