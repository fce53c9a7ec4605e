"""Fit the estimator's overhead constants from committed measurements (`qlora-bench calibrate`).

Only what no formula gives is fitted, each as the median over the records it applies to, with its spread:
- driver_idle_bytes: NVML `used` on the idle GPU before the process started;
- cuda_context_bytes: device peak (NVML, minus idle) - torch reserved peak - paged optimizer bytes, for records
  that do not load bitsandbytes;
- bnb_runtime_bytes: the same residue minus the CUDA context, for records that use bitsandbytes;
- cublas_workspace_bytes: allocated after training - allocated after load - the optimizer states the estimator
  predicts (what persists after the first step besides the states is the cuBLAS workspace);
- reserve_fraction: (torch reserved peak - allocated peak) / the estimate's dynamic bytes at the peak;
- allocated_rel_error: the analytic allocated peak's relative error on these records (the estimate's band).
The output records which records it was fitted on. Rerun after adding measurements; tests check that the
committed file equals a fresh fit.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from .estimate import estimate
from .estimate.optimizer import optimizer_bytes
from .estimate.overhead import CALIBRATION_FILE, Overheads, overheads
from .results import RESULTS_DIR, Record, load_records


def _uses_bnb(r: Record) -> bool:
    s = r.settings
    return s.method == "qlora" or s.optimizer_kind in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def _stat(values: list[float]) -> dict:
    return {
        "value": int(round(statistics.median(values))),
        "min": int(min(values)),
        "max": int(max(values)),
        "n": len(values),
    }


def _paged(r: Record) -> int:
    return r.measured.get("optimizer_state_paged_bytes") or 0


def fit(records: list[Record]) -> dict:
    from .estimate import trainable_tensors

    recs = [r for r in records if r.ok and r.measured.get("peak_device_bytes")]  # GPU runs only
    if not recs:
        raise ValueError("no successful records with device measurements to calibrate from")
    residue = {r.id: r.measured["peak_device_bytes"] - r.measured["peak_reserved_bytes"] - _paged(r) for r in recs}
    plain = [residue[r.id] for r in recs if not _uses_bnb(r)]
    ctx = _stat(plain)
    bnb = [residue[r.id] - ctx["value"] for r in recs if _uses_bnb(r)]
    cublas = []
    for r in recs:
        m = r.measured
        if m.get("mem_after_train") and m.get("mem_after_load"):
            model = r.model_spec()
            opt = optimizer_bytes(trainable_tensors(model, r.settings), r.settings.optimizer_kind)
            cublas.append(m["mem_after_train"]["allocated"] - m["mem_after_load"]["allocated"] - opt.device)
    ov0 = replace(overheads(), reserve_fraction=0.0)
    ratios = []
    for r in recs:
        e = estimate(r.model_spec(), r.settings, ov0)
        gap = r.measured["peak_reserved_bytes"] - r.measured["peak_allocated_bytes"]
        ratios.append(gap / e.dynamic_bytes)
    out = {
        "generated_by": "qlora-bench calibrate",
        "fitted_on": sorted(r.id for r in recs),
        "source_files": sorted(
            {
                str(r.path.relative_to(RESULTS_DIR.parent))
                if r.path.is_relative_to(RESULTS_DIR.parent)
                else str(r.path)
                for r in recs
            }
        ),
        "gpus": sorted({r.data.get("environment", {}).get("gpu_name") or "?" for r in recs}),
        "driver_idle_bytes": _stat([r.measured["nvml_used_baseline_bytes"] for r in recs]),
        "cuda_context_bytes": ctx,
        "bnb_runtime_bytes": _stat(bnb) if bnb else {"value": 0, "min": 0, "max": 0, "n": 0},
        "cublas_workspace_bytes": _stat(cublas) if cublas else {"value": 0, "min": 0, "max": 0, "n": 0},
        "reserve_fraction": {
            "median": round(statistics.median(ratios), 4),
            "min": round(min(ratios), 4),
            "max": round(max(ratios), 4),
            "n": len(ratios),
        },
    }
    # the analytic allocated peak with these overheads, against each record
    ov = replace(
        overheads(),
        cublas_workspace=out["cublas_workspace_bytes"]["value"],
        allocated_rel_error=0.0,
        calibrated=True,
        source="fit in progress",
    )
    errors = {}
    for r in recs:
        e = estimate(r.model_spec(), r.settings, ov)
        errors[r.id] = round(e.peak_allocated_bytes / r.measured["peak_allocated_bytes"] - 1, 4)
    abs_err = [abs(v) for v in errors.values()]
    out["allocated_rel_error"] = {
        "max": max(abs_err),
        "median": round(statistics.median(abs_err), 4),
        "per_record": errors,
    }
    return out


def write(cal: dict, path: Path = CALIBRATION_FILE) -> None:
    path.write_text(json.dumps(cal, indent=2, sort_keys=True) + "\n")
    overheads.cache_clear()


def calibrate(results: Path = RESULTS_DIR, path: Path = CALIBRATION_FILE) -> dict:
    cal = fit(load_records(results))
    write(cal, path)
    return cal


__all__ = ["fit", "write", "calibrate", "Overheads"]
