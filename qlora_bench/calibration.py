"""Fit the estimator's overhead constants from committed measurements (`qlora-bench calibrate`).

Only what no formula gives is fitted, each as the median over the records it applies to, with its spread:
- driver_idle_bytes: NVML `used` on the idle GPU before the process started;
- cuda_context_bytes: device peak (NVML, minus idle) - torch reserved peak - paged optimizer bytes, for records
  that do not load bitsandbytes;
- bnb_runtime_bytes: the same residue minus the CUDA context, for records that use bitsandbytes;
- cublas_workspace_bytes: allocated after training - allocated after load - the optimizer states the estimator
  predicts (what persists after the first step besides the states is the cuBLAS workspace).
Nothing else is fitted: the allocated and reserved peaks come from the step's allocation program replayed
through the caching-allocator model. What is recorded about them:
- allocated_rel_error / reserved_rel_error: the simulated peaks' relative errors on every GPU record (none of
  them was fitted on: out of sample); the reserved errors are the band `plan` prints;
- safety_margin: per method, the largest under-prediction of a device peak when that record was left out of
  the fit of the constants above (leave-one-out), or the estimator's shortfall (allocated or reserved) against
  `trace` at the 95th percentile of the committed crosscheck grid (results/crosscheck/grid.json), whichever is
  larger;
  `plan` adds it before it says "fits".

Hold-out: records whose id hashes into the hold-out quarter are not fitted on; `qlora-bench validate` reports
their errors separately. The output lists both sets. Rerun after adding measurements; a test checks that the
committed file equals a fresh fit.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

from .errors import InputError, write_text
from .estimate import estimate, trainable_tensors
from .estimate.optimizer import optimizer_bytes
from .estimate.overhead import CALIBRATION_FILE, Calibration, Overheads, overheads
from .results import PACKAGE_DIR, REPO_ROOT, Record, load_records
from .schema import load

HOLD_OUT_EVERY = 4  # one record in four (by id hash) is held out
PEAKS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes")
# The analytic allocated peak is within 0.2 % of every committed H100 record (calibration.json,
# allocated_rel_error); a record 25 % off is a broken record or a configuration the formulas do not model, and
# fitting the overheads on it would bend them for every plan.
MAX_ALLOCATED_ERROR = 0.25


def _uses_bnb(r: Record) -> bool:
    s = r.settings
    return s.method == "qlora" or s.optimizer_kind in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def is_held_out(record_id: str) -> bool:
    return int(hashlib.sha1(record_id.encode(), usedforsecurity=False).hexdigest(), 16) % HOLD_OUT_EVERY == 0


def _stat(values: list[float]) -> dict:
    if not values:
        return {"value": 0, "min": 0, "max": 0, "n": 0}
    return {
        "value": int(round(statistics.median(values))),
        "min": int(min(values)),
        "max": int(max(values)),
        "n": len(values),
    }


def _paged(r: Record) -> int:
    return r.measured.get("optimizer_state_paged_bytes") or 0


def _overheads_from(cal: dict) -> Overheads:
    rr = cal.get("reserved_rel_error", {})
    return replace(
        overheads(),
        cuda_context=cal["cuda_context_bytes"]["value"],
        bnb_runtime=cal["bnb_runtime_bytes"]["value"],
        cublas_workspace=cal["cublas_workspace_bytes"]["value"],
        reserved_error_under=rr.get("under", 0.0),
        reserved_error_over=rr.get("over", 0.0),
        context_spread_high=0,
        context_spread_low=0,
        driver_idle=cal["driver_idle_bytes"]["value"],
        allocated_rel_error=cal.get("allocated_rel_error", {}).get("max", 0.0),
        safety_margin=cal.get("safety_margin", {}),
        fitted_on=tuple(cal["fitted_on"]),
        calibrated=True,
        source="fit in progress",
    )


def _source_name(path: Path) -> str:
    """A record file as calibration.json names it: relative to the working directory or the repository."""
    for base in (Path.cwd(), REPO_ROOT):
        if path.resolve().is_relative_to(base.resolve()):
            return str(path.resolve().relative_to(base.resolve()))
    return str(path)


def _refuse_negative(values: dict[str, int], what: str) -> None:
    """A residue below zero means a record's figures contradict each other (NVML saw less than torch reserved):
    fitting on it would give a negative overhead, and `plan` would then call impossible plans fits."""
    bad = {k: v for k, v in values.items() if v < 0}
    if bad:
        worst = min(bad, key=bad.get)
        raise InputError(
            f"cannot calibrate {what}: {len(bad)} record(s) give a negative value ({worst}: {bad[worst] / 2**30:+.2f}"
            " GiB); their NVML and torch figures contradict each other: fix or remove them"
        )


def _ceil4(x: float) -> float:
    """Round a bound up to 4 decimals: a margin or band rounded down would no longer cover its own record."""
    return math.ceil(x * 1e4 - 1e-9) / 1e4


def _fit_constants(recs: list[Record], where: str) -> dict:
    """The constants no mechanism gives, each the median over the records it applies to."""
    residue = {r.id: r.measured["peak_device_bytes"] - r.measured["peak_reserved_bytes"] - _paged(r) for r in recs}
    _refuse_negative(residue, "the CUDA context")
    ctx = _stat([residue[r.id] for r in recs if not _uses_bnb(r)])
    bnb_extra = {r.id: residue[r.id] - ctx["value"] for r in recs if _uses_bnb(r)}
    _refuse_negative(bnb_extra, "bitsandbytes' runtime")
    bnb = _stat(list(bnb_extra.values()))
    cublas = {}
    for r in recs:
        m = r.measured
        after_train, after_load = (m.get("mem_after_train") or {}), (m.get("mem_after_load") or {})
        if after_train.get("allocated") is not None and after_load.get("allocated") is not None:
            opt = optimizer_bytes(trainable_tensors(r.model_spec(), r.settings), r.settings.optimizer_kind)
            cublas[r.id] = after_train["allocated"] - after_load["allocated"] - opt.device
    _refuse_negative(cublas, "the cuBLAS workspace")
    # a constant no record measured would be written as 0 and silently used: refuse, saying what to measure
    for stat, what, need in (
        (ctx, "the CUDA context", "a full or LoRA run with a torch optimizer (no bitsandbytes)"),
        (bnb, "bitsandbytes' runtime", "a QLoRA run or one with a bitsandbytes optimizer"),
        (_stat(list(cublas.values())), "the cuBLAS workspace", "a run with mem_after_load and mem_after_train"),
    ):
        if not stat["n"]:
            raise InputError(f"{where}: cannot calibrate {what}: no fitted record is {need}; measure one and rerun")
    return {
        "driver_idle_bytes": _stat([r.measured["nvml_used_baseline_bytes"] for r in recs]),
        "cuda_context_bytes": ctx,
        "bnb_runtime_bytes": bnb,
        "cublas_workspace_bytes": _stat(list(cublas.values())),
    }


def _held_out_shortfalls(recs: list[Record], gpu_records: list[Record], cal: dict, reserved: dict) -> dict:
    """Per record: measured device peak / the device peak predicted with constants fitted without that record,
    minus 1 (> 0: under-predicted). The simulated reserved peak does not depend on the constants except through
    the cuBLAS workspace it allocates, which is swapped for the refitted one."""
    out = {}
    ws = cal["cublas_workspace_bytes"]["value"]
    for r in gpu_records:
        rest = [x for x in recs if x.id != r.id]
        try:
            c = _fit_constants(rest, "leave-one-out") if rest else cal
        except InputError:  # without this record a constant has no data: its in-sample value is all there is
            c = cal
        context = c["cuda_context_bytes"]["value"] + (c["bnb_runtime_bytes"]["value"] if _uses_bnb(r) else 0)
        pred = reserved[r.id] + (c["cublas_workspace_bytes"]["value"] - ws) + context + _paged(r)
        out[r.id] = r.measured["peak_device_bytes"] / pred - 1
    return out


# The share of crosscheck configurations whose trace/estimator gap the margin covers: the worst few are long
# eager-attention steps whose allocator layout the estimator does not reproduce (results/crosscheck/grid.md);
# covering them would raise every plan's margin for a setting few use.
CROSSCHECK_QUANTILE = 0.95


def crosscheck_spread(rows: list[dict]) -> dict:
    """Per method: how far the estimator's allocated or reserved peak (whichever more) was under `trace`'s, at the
    CROSSCHECK_QUANTILE of the committed grid's configurations (0 where it was never under)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if r.get("trace") and r.get("analytic"):
            t, a = r["trace"], r["analytic"]
            short = max(t["reserved"] / a["reserved"], t["allocated"] / a["allocated"]) - 1
            by.setdefault(r["settings"]["method"], []).append(max(short, 0.0))
    out = {}
    for m, v in sorted(by.items()):
        v = sorted(v)
        out[m] = _ceil4(v[min(len(v) - 1, int(CROSSCHECK_QUANTILE * len(v)))])
    return {
        "quantile": CROSSCHECK_QUANTILE,
        "rows": sum(len(v) for v in by.values()),
        "under_p95": out,
    }


def fit(records: list[Record], where: str = "the records", crosscheck_rows: list[dict] | None = None) -> dict:
    # GPU runs only: the three peaks measured (a CPU smoke run has none)
    gpu_records = [r for r in records if r.ok and all(r.measured.get(k) for k in PEAKS)]
    recs = [r for r in gpu_records if not is_held_out(r.id)]
    if not recs:
        raise InputError(
            f"{where}: no successful GPU records with device measurements to calibrate from "
            f"({len(records)} records, {len(gpu_records)} with device peaks, held-out ones excluded)"
        )
    for r in gpu_records:  # every record the estimator can describe, or an error naming the record, before fitting
        with r.context():
            estimate(r.model_spec(), r.settings)
    out = {
        "generated_by": "qlora-bench calibrate",
        "fitted_on": sorted(r.id for r in recs),
        "held_out": sorted(r.id for r in gpu_records if is_held_out(r.id)),
        "source_files": sorted({_source_name(r.path) for r in recs}),
        "gpus": sorted({r.data.get("environment", {}).get("gpu_name") or "?" for r in recs}),
        **_fit_constants(recs, where),
    }
    # the simulated peaks against every record: nothing in them was fitted, so all records are out of sample
    ov = _overheads_from(out)
    alloc_err, res_err, reserved = {}, {}, {}
    for r in gpu_records:
        e = estimate(r.model_spec(), r.settings, ov)
        alloc_err[r.id] = round(e.peak_allocated_bytes / r.measured["peak_allocated_bytes"] - 1, 4)
        res_err[r.id] = round(e.peak_reserved_bytes / r.measured["peak_reserved_bytes"] - 1, 4)
        reserved[r.id] = e.peak_reserved_bytes
    worst = max(alloc_err, key=lambda k: abs(alloc_err[k]))
    if abs(alloc_err[worst]) > MAX_ALLOCATED_ERROR:
        raise InputError(
            f"cannot calibrate on record {worst}: the estimator's allocated peak is {alloc_err[worst]:+.0%} off its "
            f"measured peak_allocated_bytes; calibration fits only what no mechanism gives, on runs the estimator "
            f"models (within {MAX_ALLOCATED_ERROR:.0%}): check or remove that record"
        )
    abs_err = [abs(v) for v in alloc_err.values()]
    out["allocated_rel_error"] = {
        "max": max(abs_err),
        "median": round(statistics.median(abs_err), 4),
        "per_record": alloc_err,
    }
    # measured / predicted - 1 per record: > 0 under-predicted (the band's top), < 0 over-predicted (its bottom)
    ratio = [r.measured["peak_reserved_bytes"] / reserved[r.id] - 1 for r in gpu_records]
    out["reserved_rel_error"] = {
        "under": _ceil4(max(0.0, *ratio)),
        "over": _ceil4(max(0.0, *(-x for x in ratio))),
        "per_record": res_err,
    }
    under: dict[str, float] = {}
    for rid, shortfall in _held_out_shortfalls(recs, gpu_records, out, reserved).items():
        m = next(r for r in gpu_records if r.id == rid).settings.method
        under[m] = max(under.get(m, 0.0), _ceil4(max(shortfall, 0.0)))
    if crosscheck_rows:
        spread = crosscheck_spread(crosscheck_rows)
        out["crosscheck_spread"] = spread
        for m, v in spread["under_p95"].items():
            under[m] = max(under.get(m, 0.0), v)
    out["safety_margin"] = {**under, "default": max(under.values())}
    out["throughput"] = fit_throughput(recs)
    return out


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (tiny systems: no numpy in the base install)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        if abs(m[c][c]) < 1e-300:
            raise ZeroDivisionError("singular system")
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def nonneg_least_squares(rows: list[list[float]], target: list[float]) -> list[float]:
    """min ||X b - y|| with b >= 0, by refitting without the columns that come out negative (3 columns)."""
    active = [j for j in range(len(rows[0])) if any(r[j] for r in rows)]
    while active:
        ata = [[sum(r[i] * r[j] for r in rows) for j in active] for i in active]
        aty = [sum(r[i] * y for r, y in zip(rows, target, strict=True)) for i in active]
        sol = _solve(ata, aty)
        if all(v >= 0 for v in sol):
            out = [0.0] * len(rows[0])
            for j, v in zip(active, sol, strict=True):
                out[j] = v
            return out
        active = [j for j, v in zip(active, sol, strict=True) if v >= 0]
    return [0.0] * len(rows[0])


def fit_throughput(recs: list[Record]) -> dict:
    """Step-time coefficients by least squares on relative errors (each record's regressors divided by its
    measured median step time, fitted to 1), all non-negative and the FLOPs efficiency at most 1."""
    from .estimate.throughput import ThroughputModel, features
    from .profiles import gpu_from_device_name

    rows, used = [], []
    for r in recs:
        gpu = gpu_from_device_name((r.data.get("environment") or {}).get("gpu_name"))
        t = r.measured.get("step_seconds_median")
        f = features(r.model_spec(), r.settings, gpu) if gpu else None
        if f and t:
            rows.append([x / t for x in f])
            used.append((r, gpu, t))
    if len(rows) < 3:
        return {}
    # efficiency <= 1 (nobody beats the dense peak): fit u = 1/efficiency - 1 >= 0 on what the ideal time leaves
    target = [1.0 - row[0] for row in rows]
    try:
        u, *rest = nonneg_least_squares(rows, target)
    except ZeroDivisionError:  # the records cannot tell the terms apart (e.g. one configuration repeated)
        return {}
    coef = [round(1.0 + u, 8), *(round(c, 8) for c in rest)]
    model = ThroughputModel(*coef)
    errors = {r.id: round(model.step_seconds(r.model_spec(), r.settings, gpu) / t - 1, 4) for r, gpu, t in used}
    return {
        "inv_flops_efficiency": coef[0],
        "seconds_per_layer_full": coef[1],
        "seconds_per_layer_adapters": coef[2],
        "inv_bandwidth_efficiency": coef[3],
        "fitted_on": sorted(errors),
        "step_time_rel_error": errors,
    }


def check_fitted(cal: dict, where: str) -> dict:
    """The fitted constants against the calibration schema's physical bounds, before anything is written."""
    load(Calibration, cal, f"calibration fitted from {where}")
    return cal


def write(cal: dict, path: Path = CALIBRATION_FILE) -> Path:
    path = Path(path)
    installed = not (REPO_ROOT / ".git").exists()
    if installed and path.resolve().is_relative_to(PACKAGE_DIR):
        raise InputError(
            f"{path}: inside the installed qlora-bench package, whose calibration is read-only data; write it "
            "elsewhere (--out calibration.json) and use it with --calibration"
        )
    out = write_text(path, json.dumps(cal, indent=2, sort_keys=True, allow_nan=False) + "\n", "calibration file")
    overheads.cache_clear()
    return out


def calibrate(results: Path, path: Path) -> dict:
    """Fit from the records under `results` and write the calibration to `path` (never the packaged file
    of an installed qlora-bench)."""
    from .crosscheck import read_rows

    grid = Path(results) / "crosscheck" / "grid.json"
    rows = read_rows(grid) if Path(results).is_dir() else []
    cal = check_fitted(fit(load_records(results), str(results), rows), str(results))
    write(cal, path)
    return cal


__all__ = ["fit", "write", "calibrate", "is_held_out", "check_fitted"]
