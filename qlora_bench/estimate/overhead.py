"""Memory outside the tensors: CUDA context, library workspaces, allocator caching, the driver's own use.

No formula gives these; they are fitted by `qlora-bench calibrate` from committed measurements
(results/**/*.jsonl) into qlora_bench/calibration.json, which records what it was fitted on. The fallbacks
below are used only when that file is absent; each names its source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ..units import MiB

CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "calibration.json"

# Fallbacks (literature values, see README "Known limits"): CUDA context + libraries 1000 MiB (asmirnov's
# VRAM calculator), no allocator slack, no cuBLAS workspace, no driver reservation.
_FALLBACK = {
    "cuda_context_bytes": 1000 * MiB,
    "bnb_runtime_bytes": 0,
    "cublas_workspace_bytes": 0,
    "reserve_fraction": {"median": 0.0, "min": 0.0, "max": 0.0},
    "driver_idle_bytes": 0,
    "allocated_rel_error": {"max": 0.0},
    "safety_margin": {"default": 0.0},
    "fitted_on": [],
}


@dataclass(frozen=True)
class Overheads:
    cuda_context: int  # CUDA context + kernels/libraries loaded by torch (NVML sees it, torch does not)
    bnb_runtime: int  # extra device memory once bitsandbytes' CUDA kernels are loaded and used
    cublas_workspace: int  # cuBLAS/cuBLASLt workspaces; allocated through torch's caching allocator
    # torch reserved - allocated at the peak, as a fraction of the step's dynamic memory (allocated minus
    # weights, adapters, optimizer states, workspace): the caching allocator keeps freed blocks of the
    # activations / logits / gradients that later requests of other sizes cannot reuse. Static tensors are
    # allocated once and packed, so they add no slack.
    reserve_fraction: float
    reserve_fraction_low: float
    reserve_fraction_high: float
    driver_idle: int  # NVML `used` on an idle GPU before any process (ECC, driver): not usable by training
    allocated_rel_error: float  # worst relative error of the analytic allocated peak on the fitted records
    calibrated: bool
    source: str
    # per method, the largest fraction by which the device peak was under-predicted on the fitted records:
    # plan adds it before saying "fits"
    safety_margin: dict = field(default_factory=dict)
    fitted_on: tuple = ()
    throughput: dict = field(default_factory=dict)  # fitted step-time coefficients (throughput.py)

    def throughput_model(self):
        from .throughput import ThroughputModel

        return ThroughputModel.from_calibration(self.throughput)

    def margin(self, method: str) -> float:
        return self.safety_margin.get(method, self.safety_margin.get("default", 0.0))


@cache
def overheads() -> Overheads:
    if CALIBRATION_FILE.is_file():
        cal = json.loads(CALIBRATION_FILE.read_text())
        source = f"{CALIBRATION_FILE.name}: fitted on {len(cal.get('fitted_on', []))} records"
        calibrated = True
    else:
        cal, source, calibrated = _FALLBACK, "uncalibrated literature defaults", False

    def val(key):
        v = cal[key]
        return v["value"] if isinstance(v, dict) else v

    rr = cal["reserve_fraction"]
    return Overheads(
        cuda_context=int(val("cuda_context_bytes")),
        bnb_runtime=int(val("bnb_runtime_bytes")),
        cublas_workspace=int(val("cublas_workspace_bytes")),
        reserve_fraction=rr["median"],
        reserve_fraction_low=rr["min"],
        reserve_fraction_high=rr["max"],
        driver_idle=int(val("driver_idle_bytes")),
        allocated_rel_error=cal.get("allocated_rel_error", {}).get("max", 0.0),
        calibrated=calibrated,
        source=source,
        safety_margin=cal.get("safety_margin", {"default": 0.0}),
        fitted_on=tuple(cal.get("fitted_on", ())),
        throughput=cal.get("throughput", {}),
    )
