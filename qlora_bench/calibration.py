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


def fit(
    records: list[Record],
    where: str = "the records",
    crosscheck_rows: list[dict] | None = None,
    leave_one_out: bool = True,
) -> dict:
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
    out["step_time"] = fit_step_time(records, leave_one_out)
    return out


# ---- step time ------------------------------------------------------------------------------------------------
# The MFU no prediction may exceed: the best measured on that GPU class plus 10 points, never above 60 % on the
# plain HF stack (issue 11). Steps of < 1 s cannot separate the matmul efficiency from the rest, so the fit is held
# below the MFU that the largest configurations of the measured models would otherwise be predicted to reach.
MFU_HEADROOM, MFU_CEILING = 0.10, 0.60
# The configurations that check the cap: each measured model fine-tuned in full without checkpointing (the most
# GEMM-bound step: the highest MFU any setting reaches) at the largest steps people plan, 8 x 4,096 and 1 x 32,768
# tokens
MFU_PROBE_SIZES = ((8, 4096), (1, 32768))


def _nelder_mead(f, x0: list[float], step: float = 0.5, iters: int = 2000, tol: float = 1e-10) -> list[float]:
    """Minimize f from x0 (Nelder and Mead 1965, standard coefficients): no gradient, deterministic."""
    n = len(x0)
    pts = [list(x0)] + [[x0[j] + (step if j == i else 0.0) for j in range(n)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=lambda i: vals[i])
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < tol:
            break
        c = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        xr = [2 * c[j] - pts[-1][j] for j in range(n)]
        fr = f(xr)
        if fr < vals[0]:
            xe = [3 * c[j] - 2 * pts[-1][j] for j in range(n)]
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = [(c[j] + pts[-1][j]) / 2 for j in range(n)]
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                for i in range(1, n + 1):
                    pts[i] = [(pts[0][j] + pts[i][j]) / 2 for j in range(n)]
                    vals[i] = f(pts[i])
    return pts[min(range(n + 1), key=lambda i: vals[i])]


def _fit_theta(cases: list, bounds: dict, start: dict, probes=(), rounds: int = 2, iters: int = 1500) -> dict:
    """Least squares on log(predicted / measured) step time over (blocks, peak, bandwidth, seconds) cases, each
    constant searched in log space inside its bounds; `probes` (blocks, peak, bandwidth, useful FLOPs, MFU cap)
    add a steep penalty where their predicted MFU would pass the cap."""
    from .estimate.steptime import THETA_KEYS, simulate

    lo = [math.log(bounds[k][0]) for k in THETA_KEYS]
    hi = [math.log(bounds[k][1]) for k in THETA_KEYS]

    def theta_of(x):
        return {k: math.exp(min(max(v, a), b)) for k, v, a, b in zip(THETA_KEYS, x, lo, hi, strict=True)}

    def loss(x):
        th = theta_of(x)
        out = sum((v - min(max(v, a), b)) ** 2 for v, a, b in zip(x, lo, hi, strict=True))  # leave the bounds: costs
        for blocks, peak, bw, t in cases:
            out += math.log(simulate(blocks, th, peak, bw)[0] / t) ** 2
        for blocks, peak, bw, useful, cap in probes:
            over = useful / (simulate(blocks, th, peak, bw)[0] * peak) / cap
            if over > 1:
                out += 100 * math.log(over) ** 2
        return out

    x = [math.log(min(max(start[k], bounds[k][0]), bounds[k][1])) for k in THETA_KEYS]
    for _ in range(rounds):  # a restart: a simplex collapsed along one constant gets a fresh one
        x = _nelder_mead(loss, x, iters=iters)
    return {k: float(f"{v:.6g}") for k, v in theta_of(x).items()}


# A start inside the physical ranges (the fit moves away from it; only its basin matters)
THETA_START = {"e_mm": 0.6, "e_attn": 0.4, "e_bw": 0.7, "t_min": 3e-6, "c_py": 2e-5, "c_eng": 1e-5, "c_mod": 1e-4}


def fit_step_time(records: list[Record], leave_one_out: bool = True) -> dict:
    """Per GPU profile with measured step times: the step-time constants (estimate/steptime.py) fitted on the
    records not held out, each record's error, and its leave-one-out error (refitted without it; one refit per
    record, so about 20x the fit's time: `leave_one_out=False` leaves "loo_rel_error" out)."""
    from .estimate.steptime import THETA_BOUNDS, StepTimeModel, simulate, step_blocks
    from .estimate.throughput import flops, mfu
    from .profiles import gpu_from_device_name

    by_gpu: dict[str, list] = {}
    for r in records:
        gpu = gpu_from_device_name((r.data.get("environment") or {}).get("gpu_name"))
        t = r.measured.get("step_seconds_median")
        if not (r.ok and gpu and t and gpu.dense_tflops and gpu.memory_bandwidth_GBps):
            continue
        if r.settings.compute_dtype == "fp32":
            continue
        case = (step_blocks(r.model_spec(), r.settings), gpu.dense_tflops * 1e12, gpu.memory_bandwidth_GBps * 1e9, t)
        by_gpu.setdefault(gpu.name, []).append((r, gpu, case))
    out = {}
    for name, rows in sorted(by_gpu.items()):
        fitted = [x for x in rows if not is_held_out(x[0].id)]
        if len(fitted) < 8:  # seven constants
            continue
        gpu = rows[0][1]
        best_mfu = max(mfu(r.model_spec(), r.settings, gpu, r.measured["tokens_per_sec"])[0] for r, _, _ in rows)
        cap = min(best_mfu + MFU_HEADROOM, MFU_CEILING)
        models = sorted({r.model for r, _, _ in rows})
        probes = [
            (
                r.model_spec(),
                r.settings.with_(batch=b, seq=q, grad_accum=1, method="full", gradient_checkpointing=False),
            )
            for m in models
            for r in [next(x[0] for x in rows if x[0].model == m)]
            for b, q in MFU_PROBE_SIZES
        ]
        peak, bw = gpu.dense_tflops * 1e12, gpu.memory_bandwidth_GBps * 1e9
        checks = [
            (step_blocks(m, s), peak, bw, flops(m, s).useful_per_token * s.batch * s.seq * s.grad_accum, cap)
            for m, s in probes
        ]
        theta = _fit_theta([c for _, _, c in fitted], THETA_BOUNDS, THETA_START, checks)
        model = StepTimeModel({name: {"theta": theta}})
        errors = {r.id: round(model.step_seconds(r.model_spec(), r.settings, gpu) / c[3] - 1, 4) for r, _, c in rows}
        loo = {}
        for r, _, c in rows if leave_one_out else ():
            rest = [x[2] for x in fitted if x[0] is not r]
            # refitted from the same start as the fit itself (not from its optimum): the error is out of sample
            th = _fit_theta(rest, THETA_BOUNDS, THETA_START, checks, rounds=2, iters=750)
            loo[r.id] = round(
                StepTimeModel({name: {"theta": th}}).step_seconds(r.model_spec(), r.settings, gpu) / c[3] - 1, 4
            )
        out[name] = {
            "theta": theta,
            "max_probe_mfu": round(max(u / (simulate(b, theta, pk, w)[0] * pk) for b, pk, w, u, _ in checks), 4),
            "best_measured_mfu": round(best_mfu, 4),
            "mfu_cap": round(cap, 4),
            "fitted_on": sorted(r.id for r, _, _ in fitted),
            "rel_error": errors,
            **({"loo_rel_error": loo} if leave_one_out else {}),
        }
    return out


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
