"""Memory outside the tensors: CUDA context, library workspaces, the driver's own use.

No mechanism gives these; they are fitted by `qlora-bench calibrate` from committed measurements
(results/**/*.jsonl) into qlora_bench/calibration.json, which records what it was fitted on. The allocator's
caching is not fitted: it is simulated (allocator.py); the calibration only records how far the simulation
was from each measured run (the band) and the held-out under-predictions (the safety margin). The fallbacks
below are used only when that file is absent; each names its source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ..errors import InputError, read_json_object
from ..schema import Extra, load, rule
from ..units import MiB

CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "calibration.json"

# Fallbacks (literature values, see README "Known limits"): CUDA context + libraries 1000 MiB (asmirnov's
# VRAM calculator), no allocator slack, no cuBLAS workspace, no driver reservation.
_FALLBACK = {
    "cuda_context_bytes": 1000 * MiB,
    "bnb_runtime_bytes": 0,
    "cublas_workspace_bytes": 0,
    "reserved_rel_error": {"under": 0.0, "over": 0.0},
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
    # the simulated reserved peak's worst relative under- and over-prediction on the committed records: the band
    reserved_error_under: float
    reserved_error_over: float
    driver_idle: int  # NVML `used` on an idle GPU before any process (ECC, driver): not usable by training
    # how far above / below the fitted medians the context (+ bitsandbytes' runtime) was measured: the band
    context_spread_high: int
    context_spread_low: int
    allocated_rel_error: float  # worst relative error of the analytic allocated peak on the fitted records
    calibrated: bool
    source: str
    # per method, the largest fraction by which a device peak was under-predicted when its record was held out
    # of the fit (leave-one-out): plan adds it before saying "fits"
    safety_margin: dict = field(default_factory=dict)
    fitted_on: tuple = ()
    step_time: dict = field(default_factory=dict)  # per GPU profile: fitted step-time constants (steptime.py)

    def throughput_model(self):
        from .steptime import StepTimeModel

        return StepTimeModel.from_calibration(self.step_time)

    def margin(self, method: str) -> float:
        return self.safety_margin.get(method, self.safety_margin.get("default", 0.0))


# ---- the calibration file's schema ---------------------------------------------------------------------------
# Bounds of what the fitted constants can physically be: the CUDA context, library runtimes, the cuBLAS workspace
# and the driver's idle use are each well under 2 GiB on every GPU measured or documented (H100: 0.75, 0.08,
# 0.06, 0.47 GiB); 16 GiB refuses nonsense (a broken record set) without second-guessing a new GPU.
MAX_OVERHEAD_BYTES = 16 * 1024**3


@dataclass(frozen=True)
class FittedBytes:
    value: int = rule(ge=0, le=MAX_OVERHEAD_BYTES)
    min: int = rule(ge=0, le=MAX_OVERHEAD_BYTES)
    max: int = rule(ge=0, le=MAX_OVERHEAD_BYTES)
    n: int = rule(ge=0, le=10**7)

    def check(self, where: str) -> None:
        if not self.min <= self.value <= self.max:
            raise InputError(f"{where}: value {self.value} is outside its own range [{self.min}, {self.max}]")


# Relative errors: 0.1 % (allocated), 1.6 % (reserved) and up to 30 % (step time) measured; 1 and 1e4 refuse only
# nonsense.
@dataclass(frozen=True)
class ReservedError:
    """How far the simulated reserved peak was from the measured one: the worst under- and over-prediction."""

    extra = Extra.ALLOW
    under: float = rule(ge=0, lt=1, hint="worst relative under-prediction of the reserved peak")
    over: float = rule(ge=0, lt=1, hint="worst relative over-prediction of the reserved peak")
    per_record: dict[str, float] = rule(factory=dict, ge=-1, le=10)


@dataclass(frozen=True)
class AllocatedError:
    max: float = rule(ge=0, le=1, hint="worst relative error of the allocated peak")
    median: float = rule(0.0, ge=0, le=1)
    per_record: dict[str, float] = rule(factory=dict, ge=-1, le=10)


@dataclass(frozen=True)
class StepTimeConstants:
    """steptime.py's constants, inside steptime.THETA_BOUNDS (what they can physically be)."""

    e_mm: float = rule(ge=0.01, le=1, hint="fraction of the dense peak a large GEMM reaches")
    e_attn: float = rule(ge=0.01, le=1, hint="fraction of the dense peak attention reaches")
    e_bw: float = rule(ge=0.01, le=1, hint="fraction of the memory bandwidth a memory-bound kernel reaches")
    t_min: float = rule(ge=0, le=1e-3, hint="seconds: the shortest kernel")
    c_py: float = rule(ge=0, le=1e-2, hint="host seconds per kernel launched from Python")
    c_eng: float = rule(ge=0, le=1e-2, hint="host seconds per kernel launched by autograd's engine")
    c_mod: float = rule(ge=0, le=1e-1, hint="host seconds per Python module / autograd.Function call")


@dataclass(frozen=True)
class StepTimeFit:
    """One GPU profile's step-time fit (calibration.fit_step_time)."""

    extra = Extra.ALLOW
    theta: StepTimeConstants
    fitted_on: list[str] = rule(factory=list, max_len=500)
    rel_error: dict[str, float] = rule(factory=dict, ge=-1, le=1e4)
    loo_rel_error: dict[str, float] = rule(factory=dict, ge=-1, le=1e4)


@dataclass(frozen=True)
class Calibration:
    """qlora_bench/calibration.json, or a file `qlora-bench calibrate --out` wrote."""

    extra = Extra.ALLOW
    driver_idle_bytes: FittedBytes
    cuda_context_bytes: FittedBytes
    bnb_runtime_bytes: FittedBytes
    cublas_workspace_bytes: FittedBytes
    reserved_rel_error: ReservedError
    allocated_rel_error: AllocatedError
    safety_margin: dict[str, float] = rule(ge=0, lt=1, hint="per method: fraction added before saying fits")
    fitted_on: list[str] = rule(factory=list, max_len=500)
    held_out: list[str] = rule(factory=list, max_len=500)
    source_files: list[str] = rule(factory=list, max_len=4096)
    gpus: list[str] = rule(factory=list, max_len=200)
    generated_by: str | None = None
    step_time: dict[str, StepTimeFit] = rule(factory=dict)

    def check(self, where: str) -> None:
        if "default" not in self.safety_margin:
            raise InputError(f"{where}: field 'safety_margin' has no 'default'; expected one per method and a default")


def read_calibration(path: Path) -> dict:
    """A calibration file's content, checked against the schema (its raw dict: fit() writes the same shape)."""
    data = read_json_object(path, "calibration file")
    load(Calibration, data, str(path))
    return data


# the calibration in use: the packaged file unless `use_calibration` named another (plan --calibration FILE, or
# the QLORA_BENCH_CALIBRATION environment variable)
_chosen: Path | None = None


def use_calibration(path: str | Path | None) -> None:
    """Plan, validate and report with this calibration file instead of the packaged one (checked now)."""
    global _chosen
    if path is not None:
        read_calibration(Path(path))
    _chosen = None if path is None else Path(path)
    overheads.cache_clear()


def calibration_file() -> Path:
    env = os.environ.get("QLORA_BENCH_CALIBRATION")
    return _chosen or (Path(env) if env else CALIBRATION_FILE)


def _spread(cal: dict, end: str) -> int:
    """max - value (or value - min) of the CUDA context plus bitsandbytes' runtime: what the band adds."""
    total = 0
    for key in ("cuda_context_bytes", "bnb_runtime_bytes"):
        v = cal[key]
        if isinstance(v, dict):
            total += (v[end] - v["value"]) if end == "max" else (v["value"] - v[end])
    return total


@cache
def overheads() -> Overheads:
    path = calibration_file()
    if path == CALIBRATION_FILE and not path.is_file():
        cal, source, calibrated = _FALLBACK, "uncalibrated literature defaults", False
    else:
        try:
            cal = read_calibration(path)
        except InputError as e:
            if _chosen is None and os.environ.get("QLORA_BENCH_CALIBRATION"):  # say where the path came from
                raise InputError(f"QLORA_BENCH_CALIBRATION: {e}") from None
            raise
        source = f"{path.name}: fitted on {len(cal.get('fitted_on', []))} records"
        calibrated = True

    def val(key):
        v = cal[key]
        return v["value"] if isinstance(v, dict) else v

    rr = cal["reserved_rel_error"]
    return Overheads(
        cuda_context=int(val("cuda_context_bytes")),
        bnb_runtime=int(val("bnb_runtime_bytes")),
        cublas_workspace=int(val("cublas_workspace_bytes")),
        reserved_error_under=rr["under"],
        reserved_error_over=rr["over"],
        context_spread_high=_spread(cal, "max"),
        context_spread_low=_spread(cal, "min"),
        driver_idle=int(val("driver_idle_bytes")),
        allocated_rel_error=cal.get("allocated_rel_error", {}).get("max", 0.0),
        calibrated=calibrated,
        source=source,
        safety_margin=cal.get("safety_margin", {"default": 0.0}),
        fitted_on=tuple(cal.get("fitted_on", ())),
        step_time=cal.get("step_time", {}),
    )
