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

from .errors import InputError, read_json
from .results import REPO_ROOT, Record, load_records

SCHEMA = 1
MEMORY_METRICS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes")
THROUGHPUT_METRIC = "tokens_per_sec"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


@dataclass(frozen=True)
class Tolerances:
    memory: float = 0.02  # a peak may grow by this fraction before it is a regression
    throughput: float = 0.05  # tokens/s may fall by this fraction before it is a regression


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
    if not path.is_file():
        raise InputError(f"{path}: no such baseline (create one with `qlora-bench baseline update`)")
    b = read_json(path)
    for key in ("schema", "gpu", "configs"):
        if key not in b:
            raise InputError(f"{path}: missing field '{key}'")
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


def git_state() -> tuple[str | None, bool]:
    """(commit, clean) of the repository."""
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
    commit, clean = git_state()
    if not clean and not allow_dirty:
        raise InputError(
            "the working tree is not clean: commit first, so the baseline records the commit it "
            "came from (or pass --allow-dirty for a local experiment)"
        )
    records = [r for r in load_records(results, kind="train")]
    b = baseline_from_records(records, source=str(results), commit=commit if clean else f"{commit}-dirty")
    if dest is None:
        from .profiles import slug_for

        dest = REPO_ROOT / "results" / "baselines" / f"{slug_for(b['gpu'])}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(b, indent=2, sort_keys=True) + "\n")
    return dest


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
    if b is None or n is None:
        return Change(name, metric, b, n, "ok" if b == n else "missing", tol)
    change = n / b - 1 if b else 0.0
    worse = change if higher_is_worse else -change
    if worse > tol:
        status = "regression" if worse > max(tol, noise) else "within noise"
    elif worse < -tol:
        status = "improved"
    else:
        status = "ok"
    return Change(name, metric, b, n, status, max(tol, noise))
