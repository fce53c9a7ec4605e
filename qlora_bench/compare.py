"""Regression checks against committed baselines (`qlora-bench compare`, `qlora-bench baseline update`).

pytest-benchmark only fails on timing statistics and does not know the GPU, so the comparison of peak memory and
tokens/s is ours. A baseline (results/baselines/<gpu>.json) holds, per configuration key, the metrics of one
GPU model under one set of library versions, with its provenance (commit, source file). A comparison:
- refuses a baseline from a different GPU model (the numbers are not comparable);
- flags different library versions (that is usually what is being tested) without failing on it;
- per configuration and metric: `regression` when memory grew beyond its tolerance (default +2 %) or tokens/s
  fell beyond its tolerance (default -5 %) *and* beyond the measured run-to-run spread of that configuration;
  `within noise` when the change passes the configured tolerance but not the measured spread; `improved`;
  `ok`; an outcome that went from ok to oom/error is a regression; a configuration of the baseline that is
  missing from the new results is reported as `missing` (a failure unless allowed).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import InputError, read_json_object, write_text
from .results import MAX_BYTES, OUTCOMES, REPO_ROOT, Record, load_records
from .schema import Extra, check_fields, load, rule

SCHEMA = 1
MEMORY_METRICS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes")
THROUGHPUT_METRIC = "tokens_per_sec"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


MAX_TOLERANCE = 1.0  # a tolerance of 100 % or more would let a doubled peak through: not a regression check


@dataclass(frozen=True)
class Tolerances:
    memory: float = rule(0.02, ge=0, lt=MAX_TOLERANCE, hint="a peak may grow by this fraction, e.g. 0.02")
    throughput: float = rule(0.05, ge=0, lt=MAX_TOLERANCE, hint="tokens/s may fall by this fraction, e.g. 0.05")

    def __post_init__(self):
        check_fields(self, "tolerances")


@dataclass(frozen=True)
class BaselineConfig:
    """One configuration's metrics in a baseline (a measured peak is never 0 bytes; tokens/s never 0)."""

    extra = Extra.ALLOW
    id: str | None = rule(None, max_len=500)
    settings: dict | None = None
    outcome: Literal[OUTCOMES] | None = None
    peak_allocated_bytes: int | None = rule(None, ge=1, le=MAX_BYTES)
    peak_reserved_bytes: int | None = rule(None, ge=1, le=MAX_BYTES)
    peak_device_bytes: int | None = rule(None, ge=1, le=MAX_BYTES)
    tokens_per_sec: float | None = rule(None, gt=0, le=1e9)
    # (max - min) / median of a record's tokens/s: 0.3 measured for short H100 steps; 100 only refuses nonsense
    tokens_per_sec_spread: float | None = rule(None, ge=0, le=100, hint="(max - min) / median tokens/s")


@dataclass(frozen=True)
class Baseline:
    """results/baselines/<gpu>.json, as `baseline update` writes it."""

    extra = Extra.ALLOW
    schema: Literal[SCHEMA]
    gpu: str = rule(nonempty=True, max_len=200, hint="the GPU model's name as NVML reports it")
    configs: dict[str, BaselineConfig] = rule(hint="configuration key -> metrics")
    driver: str | None = rule(None, max_len=100)
    versions: dict[str, str | None] = rule(factory=dict, max_len=200)
    provenance: dict = rule(factory=dict)


@dataclass
class Change:
    config: str
    metric: str
    baseline: float | None
    new: float | None
    status: str  # ok | improved | within noise | regression | missing | new
    tolerance: float | None = None

    @property
    def change(self) -> float | None:
        return None if not self.baseline or self.new is None else self.new / self.baseline - 1

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "metric": self.metric,
            "baseline": self.baseline,
            "new": self.new,
            "change": self.change,
            "tolerance": self.tolerance,
            "status": self.status,
        }


@dataclass
class Comparison:
    gpu: str
    changes: list[Change] = field(default_factory=list)
    version_differences: dict = field(default_factory=dict)
    allow_missing: bool = False

    @property
    def regressions(self) -> list[Change]:
        bad = {"regression"} | (set() if self.allow_missing else {"missing"})
        return [c for c in self.changes if c.status in bad]

    @property
    def failed(self) -> bool:
        return bool(self.regressions)

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu,
            "failed": self.failed,
            "version_differences": self.version_differences,
            "changes": [c.to_dict() for c in self.changes],
        }


# ---- baselines --------------------------------------------------------------------------------------------
def _spread(m: dict) -> float | None:
    """Run-to-run spread of tokens/s within one record: (max - min) / median over its timed steps."""
    lo, hi, med = m.get("tokens_per_sec_min"), m.get("tokens_per_sec_max"), m.get("tokens_per_sec")
    if lo and hi and med:
        return round((hi - lo) / med, 4)
    steps = (m.get("step_seconds") or [])[m.get("warmup_steps") or 0 :]
    if len(steps) >= 2 and min(steps) > 0:  # older records: every step time, no min/max
        import statistics

        rates = [1 / t for t in steps]
        return round((max(rates) - min(rates)) / statistics.median(rates), 4)
    return None


def _config_key(r: Record) -> str:
    return r.data.get("key") or r.id


def baseline_from_records(records: list[Record], source: str = "", commit: str | None = None) -> dict:
    gpus = {(r.data.get("environment") or {}).get("gpu_name") for r in records}
    gpus.discard(None)
    if len(gpus) != 1:
        raise InputError(f"a baseline needs records of exactly one GPU model, got {sorted(gpus) or 'none'}")
    env = records[0].data.get("environment") or {}
    configs = {}
    for r in records:
        m = r.measured or {}
        configs[_config_key(r)] = {
            "id": r.id,
            "settings": r.data.get("settings"),
            "outcome": r.data.get("outcome"),
            **{k: m.get(k) for k in (*MEMORY_METRICS, THROUGHPUT_METRIC)},
            "tokens_per_sec_spread": _spread(m),
        }
    return {
        "schema": SCHEMA,
        "gpu": gpus.pop(),
        "driver": env.get("driver"),
        "versions": {k: (env.get("versions") or {}).get(k) for k in LIBRARIES},
        "provenance": {"source": source, "commit": commit, "created_by": "qlora-bench baseline update"},
        "configs": dict(sorted(configs.items())),
    }


def load_baseline(path: Path) -> dict:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: no such baseline (create one with `qlora-bench baseline update`)")
    b = read_json_object(path, "baseline JSON file")
    load(Baseline, b, str(path))
    return b


def load_side(path: Path) -> dict:
    """A comparison side: a baseline .json, or result records (.jsonl file or folder) turned into one."""
    path = Path(path)
    if path.suffix == ".json":
        return load_baseline(path)
    records = [r for r in load_records(path, kind="train")]
    if not records:
        raise InputError(f"{path}: no result records")
    return baseline_from_records(records, source=str(path))


def git_state() -> tuple[str | None, bool] | None:
    """(commit, clean) of the qlora-bench source checkout this code runs from; None for an installed package
    (whose version, not a commit, says what measured)."""
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return commit, not dirty
    except (OSError, subprocess.SubprocessError):
        return None, False


def update_baseline(results: Path, dest: Path | None = None, allow_dirty: bool = False) -> Path:
    """Write a baseline from `results` to `dest` (default: results/baselines/<gpu>.json in the working directory).
    In a source checkout the tree must be clean, so the baseline names the commit it came from; an installed
    package records its version instead."""
    from . import __version__

    state = git_state()
    if state is not None:
        commit, clean = state
        if not clean and not allow_dirty:
            raise InputError(
                "the working tree is not clean: commit first, so the baseline records the commit it "
                "came from (or pass --allow-dirty for a local experiment)"
            )
        commit = commit if clean else f"{commit}-dirty"
    else:
        commit = None
    records = load_records(results, kind="train")
    if not records:
        raise InputError(f"{results}: no training records to make a baseline from")
    b = baseline_from_records(records, source=str(results), commit=commit)
    b["provenance"]["qlora_bench_version"] = __version__
    if dest is None:
        from .profiles import slug_for

        dest = Path("results") / "baselines" / f"{slug_for(b['gpu'])}.json"
    return write_text(dest, json.dumps(b, indent=2, sort_keys=True, allow_nan=False) + "\n", "baseline file")


# ---- comparison -------------------------------------------------------------------------------------------
def compare(new: dict, base: dict, tol: Tolerances = Tolerances(), allow_missing: bool = False) -> Comparison:
    if new["gpu"] != base["gpu"]:
        raise InputError(
            f"baseline is for {base['gpu']!r} but the new results come from {new['gpu']!r}: "
            "compare against the baseline of the same GPU model"
        )
    out = Comparison(gpu=base["gpu"], allow_missing=allow_missing)
    out.version_differences = {
        k: [base.get("versions", {}).get(k), new.get("versions", {}).get(k)]
        for k in LIBRARIES
        if base.get("versions", {}).get(k) != new.get("versions", {}).get(k)
    }
    for key, b in base["configs"].items():
        n = new["configs"].get(key)
        name = b.get("id") or key
        if n is None:
            out.changes.append(Change(name, "configuration", None, None, "missing"))
            continue
        if b.get("outcome") == "ok" and n.get("outcome") != "ok":
            out.changes.append(Change(name, "outcome", None, None, "regression"))
            continue
        for metric in MEMORY_METRICS:
            out.changes.append(_judge(name, metric, b.get(metric), n.get(metric), tol.memory, higher_is_worse=True))
        noise = max(b.get("tokens_per_sec_spread") or 0.0, n.get("tokens_per_sec_spread") or 0.0)
        out.changes.append(
            _judge(
                name,
                THROUGHPUT_METRIC,
                b.get(THROUGHPUT_METRIC),
                n.get(THROUGHPUT_METRIC),
                tol.throughput,
                higher_is_worse=False,
                noise=noise,
            )
        )
    for key, n in new["configs"].items():
        if key not in base["configs"]:
            out.changes.append(Change(n.get("id") or key, "configuration", None, None, "new"))
    return out


def _judge(name, metric, b, n, tol, higher_is_worse: bool, noise: float = 0.0) -> Change:
    if b is None or n is None or not b or not n:  # not measured on one side (a 0 peak is no measurement either)
        return Change(name, metric, b, n, "ok" if b == n else "missing", tol)
    change = n / b - 1
    worse = change if higher_is_worse else -change
    if worse > tol:
        status = "regression" if worse > max(tol, noise) else "within noise"
    elif worse < -tol:
        status = "improved"
    else:
        status = "ok"
    return Change(name, metric, b, n, status, max(tol, noise))
