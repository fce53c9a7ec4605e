"""Estimate versus measurement, per record and in summary (`qlora-bench validate`).

For every successful GPU record: measured vs predicted peak allocated / reserved / device memory (error in % and
GiB), the static part (memory after load and adapter wrap vs the estimator's weights + quantization constants +
adapters; optimizer state bytes vs the estimator's), so an error can be traced to its component. OOM records are
checked the other way: the estimator must not say they fit (a false fit). Records the calibration was not
fitted on are reported separately (hold-out).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .estimate import Estimate, estimate
from .estimate.overhead import overheads
from .profiles import GpuSpec
from .results import Record

GPU_TOTAL_KEYS = ("nvml_total_bytes", "gpu_total_bytes")


@dataclass
class Row:
    record: Record
    estimate: Estimate
    held_out: bool
    measured: dict  # name -> bytes (None where not measured)
    predicted: dict
    fits_predicted: bool | None
    false_fit: bool
    throughput: dict = field(default_factory=dict)  # measured / predicted tokens/s, MFU, HFU, step seconds

    @property
    def has_memory(self) -> bool:
        """A device peak was measured (the shared throughput-only records withhold theirs), or the run hit OOM."""
        return bool(self.measured.get("peak_device_bytes")) or self.record.data.get("outcome") == "oom"

    def error(self, key: str) -> float | None:
        m, p = self.measured.get(key), self.predicted.get(key)
        return None if not m or p is None else p / m - 1

    def to_dict(self) -> dict:
        return {
            "id": self.record.id,
            "outcome": self.record.data.get("outcome"),
            "method": self.record.settings.method,
            "held_out": self.held_out,
            "measured": self.measured,
            "predicted": self.predicted,
            "errors": {k: self.error(k) for k in self.predicted},
            "fits_predicted": self.fits_predicted,
            "false_fit": self.false_fit,
            "throughput": self.throughput,
        }


@dataclass
class Summary:
    n: int
    n_memory: int = 0  # records with a measured device peak (or an OOM)
    n_throughput: int = 0  # records with a measured and a predicted tokens/s
    median_abs_error: dict = field(default_factory=dict)
    worst_abs_error: dict = field(default_factory=dict)
    false_fits: int = 0

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "n_memory": self.n_memory,
            "n_throughput": self.n_throughput,
            "median_abs_error": self.median_abs_error,
            "worst_abs_error": self.worst_abs_error,
            "false_fits": self.false_fits,
        }


PEAKS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes")
STATIC = ("static_after_load_bytes", "optimizer_state_bytes")


def _record_gpu(r: Record) -> GpuSpec | None:
    env = r.data.get("environment") or {}
    total = next((env[k] for k in GPU_TOTAL_KEYS if env.get(k)), None)
    return GpuSpec(name=env.get("gpu_name") or "gpu", memory_total_bytes=total) if total else None


def validate_record(r: Record, held_out: bool) -> Row:
    from .plan import fits_with_margin, usable_bytes

    e = estimate(r.model_spec(), r.settings)
    m = r.measured
    load = (m.get("mem_after_load") or {}).get("allocated")
    measured = {k: m.get(k) for k in PEAKS}
    measured["static_after_load_bytes"] = load
    # the records count each state tensor once; bitsandbytes' shared qmaps are counted per parameter by the
    # shared measurements, so compare the non-paged + paged state bytes the estimator models
    measured["optimizer_state_bytes"] = m.get("optimizer_state_bytes")
    ph = e.phases["loss"]
    predicted = {
        "peak_allocated_bytes": e.peak_allocated_bytes,
        "peak_reserved_bytes": e.peak_reserved_bytes,
        "peak_device_bytes": e.peak_device_bytes,
        "static_after_load_bytes": ph["weights_4bit"]
        + ph["quant_constants"]
        + ph["weights_dense"]
        + ph["lora_adapters"],
        "optimizer_state_bytes": ph["optimizer_states"] + e.paged_bytes,
    }
    gpu = _record_gpu(r)
    fits = fits_with_margin(e, usable_bytes(gpu)) if gpu else None
    oom = r.data.get("outcome") == "oom"
    over = bool(gpu and m.get("peak_device_bytes") and m["peak_device_bytes"] > usable_bytes(gpu))
    return Row(
        r,
        e,
        held_out,
        measured,
        predicted,
        fits,
        false_fit=bool(fits and (oom or over)),
        throughput=throughput_row(r, e),
    )


def throughput_row(r: Record, e: Estimate) -> dict:
    """Measured and predicted tokens/s, and the measured MFU / HFU, on the record's GPU profile."""
    from .estimate.throughput import mfu
    from .profiles import gpu_from_device_name

    gpu = gpu_from_device_name((r.data.get("environment") or {}).get("gpu_name"))
    tps = r.measured.get("tokens_per_sec")
    if not gpu or not tps:
        return {}
    tm = e.overheads.throughput_model()
    pred = tm.tokens_per_second(e.model, e.settings, gpu) if tm else None
    util = mfu(e.model, e.settings, gpu, tps)
    # the step-time error with this record left out of the fit (calibration.json), as a tokens/s error
    loo = ((tm.classes.get(gpu.name) or {}).get("loo_rel_error") or {}).get(r.id) if tm else None
    return {
        "gpu_profile": gpu.name,
        "tokens_per_sec": tps,
        "tokens_per_sec_predicted": None if pred is None else round(pred, 1),
        "error": None if pred is None else round(pred / tps - 1, 4),
        "error_left_out": None if loo is None else round(1 / (1 + loo) - 1, 4),
        "step_seconds": r.measured.get("step_seconds_median"),
        "mfu": None if util is None else round(util[0], 4),
        "hfu": None if util is None else round(util[1], 4),
    }


def validate(records: list[Record]) -> tuple[list[Row], dict[str, Summary]]:
    """Rows for successful GPU records (memory and throughput, or throughput alone where a record withholds its
    memory) and OOMs; summaries for all, fitted-on and held-out records."""
    fitted_on = set(overheads().fitted_on)
    rows = []
    for r in records:
        on_gpu = bool((r.data.get("environment") or {}).get("gpu_name"))
        gpu_measured = r.ok and (r.measured.get("peak_device_bytes") or (on_gpu and r.measured.get("tokens_per_sec")))
        if gpu_measured or r.data.get("outcome") == "oom":
            with r.context():
                rows.append(validate_record(r, held_out=r.id not in fitted_on))
    groups = {"all": rows, "fitted": [x for x in rows if not x.held_out], "held-out": [x for x in rows if x.held_out]}
    return rows, {name: summarize(g) for name, g in groups.items()}


def summarize(rows: list[Row]) -> Summary:
    tput = [abs(x.throughput["error"]) for x in rows if x.throughput.get("error") is not None]
    s = Summary(
        n=len(rows),
        n_memory=sum(x.has_memory for x in rows),
        n_throughput=len(tput),
        false_fits=sum(x.false_fit for x in rows),
    )
    long = [
        abs(x.throughput["error"])
        for x in rows
        if x.throughput.get("error") is not None and (x.throughput.get("step_seconds") or 0) >= 1.0
    ]
    if tput:
        s.median_abs_error["tokens_per_sec"] = round(statistics.median(tput), 4)
        s.worst_abs_error["tokens_per_sec"] = round(max(tput), 4)
    left_out = [abs(x.throughput["error_left_out"]) for x in rows if x.throughput.get("error_left_out") is not None]
    if left_out:
        s.median_abs_error["tokens_per_sec_left_out"] = round(statistics.median(left_out), 4)
        s.worst_abs_error["tokens_per_sec_left_out"] = round(max(left_out), 4)
    s.long_step_records = len(long)
    if long:
        s.worst_abs_error["tokens_per_sec_long_steps"] = round(max(long), 4)
    for key in (*PEAKS, *STATIC):
        errs = [abs(x.error(key)) for x in rows if x.error(key) is not None]
        if errs:
            s.median_abs_error[key] = round(statistics.median(errs), 4)
            s.worst_abs_error[key] = round(max(errs), 4)
    return s
