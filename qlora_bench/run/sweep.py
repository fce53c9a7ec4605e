"""Sweeps: a grid of configurations, each run in a fresh subprocess, appended to a JSONL file as it finishes.

- Resumable: configurations whose key is already in the output file are skipped.
- Crash-proof: an OOM or error is the worker's recorded outcome; a segfault, a CUDA error that kills the process
  or a timeout is recorded by the sweep as `crash` / `timeout`. A killed sweep loses at most the configuration
  in flight (records are flushed and fsynced one by one).
- Cheap ordering: configurations that differ only in batch and sequence run smallest first, and after an OOM
  the larger ones are recorded as `skipped_oom` instead of run.
- `shard=(i, n)` runs every n-th configuration (1-based i), so n machines split one sweep.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import flags
from ..errors import InputError, file_kind, parse_yaml, read_text, shown
from ..results import SCHEMA_VERSION, append_record, load_records
from ..schema import load, rule
from ..settings import DEFAULT_OPTIMIZER, Settings
from .config import RunConfig
from .train import RunOptions

GRID_KEYS = {f for f in Settings.__dataclass_fields__} | {"model"}
FINAL_OUTCOMES = ("ok", "oom", "error", "crash", "timeout", "skipped_oom")


@dataclass
class Sweep:
    name: str
    configs: list[RunConfig]
    timeout_s: float = 1800.0
    source: str = ""


@dataclass
class SweepSummary:
    counts: dict[str, int] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    skipped_done: int = 0


# A sweep of more configurations than this is a mistake in the grid (each one is a real training run in its own
# process); the product is computed before anything is expanded, so a huge grid is refused at once.
MAX_CONFIGS = 10_000
_SCALAR = (str, int, float, bool)


@dataclass(frozen=True)
class SweepFile:
    """A sweep YAML file (see sweeps/): grid entries, shared defaults, run options."""

    grid: list[dict] = rule(nonempty=True, hint="grid entries: mappings of model and settings fields to values")
    name: str | None = rule(None, pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", hint="a name usable as a file name")
    defaults: dict = rule(factory=dict, hint="settings shared by every grid entry")
    options: RunOptions = rule(factory=RunOptions)
    timeout_s: float = rule(1800, gt=0, le=7 * 86400, hint="seconds per configuration")


# grid values as the command line takes them: names case-insensitive, token counts with a suffix (seq: 8k)
_NAMES = ("method", "quant", "compute_dtype", "optimizer", "attn")
_COUNTS = {"batch": flags.DECIMAL, "seq": flags.BINARY, "grad_accum": flags.DECIMAL, "rank": flags.DECIMAL}


def _values(key: str, value, where: str) -> list:
    """A grid value: one scalar or a non-empty list of them."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, _SCALAR) for v in values):
        raise InputError(
            f"{where}: field '{key}' is {shown(value)}; expected a value or a non-empty list of values (e.g. [1, 2])"
        )
    if key == "model" and not all(isinstance(v, str) and v.strip() for v in values):
        raise InputError(f"{where}: field 'model' is {shown(value)}; expected a model name or a list of names")
    if key in _NAMES:
        values = [v.lower() if isinstance(v, str) else v for v in values]
    if key in _COUNTS:  # '8k' -> 8192; anything else is left for the Settings schema to judge
        values = [flags.scaled(v, _COUNTS[key]) or v if isinstance(v, str) else v for v in values]
    return values


def expand(entry: dict, defaults: dict, options: RunOptions, where: str) -> list[RunConfig]:
    unknown = sorted(str(k) for k in {**defaults, **entry} if k not in GRID_KEYS)
    if unknown:
        raise InputError(
            f"{where}: unknown key(s) {', '.join(unknown[:5])}; grid keys: model and the settings fields "
            f"({', '.join(sorted(GRID_KEYS - {'model'}))})"
        )
    if "model" not in entry and "model" not in defaults:
        raise InputError(f"{where}: no 'model' (in the entry or in defaults)")
    merged = {k: _values(k, v, where) for k, v in {**defaults, **entry}.items()}
    size = math.prod(len(v) for v in merged.values())
    if size > MAX_CONFIGS:
        raise InputError(f"{where}: the grid has {size:,} configurations; expected at most {MAX_CONFIGS:,}")
    keys = list(merged)
    out = []
    for values in itertools.product(*merged.values()):
        d = dict(zip(keys, values, strict=True))
        model = d.pop("model")
        if isinstance(d.get("method"), str):  # the default optimizer follows the method, as on the command line
            d.setdefault("optimizer", DEFAULT_OPTIMIZER.get(d["method"], "paged_adamw_8bit"))
        out.append(RunConfig(model, Settings.from_dict(d, where), options))
    return out


def from_mapping(data: object, where: str) -> Sweep:
    if isinstance(data, dict):
        # `defaults:` or `options:` with every line commented out is null in YAML: the same as leaving it out
        data = {k: v for k, v in data.items() if not (k in ("defaults", "options") and v is None)}
        if "grid" in data and not isinstance(data["grid"], list):
            data["grid"] = [data["grid"]]  # one grid entry without the list
    f = load(SweepFile, data, where)
    configs = []
    for i, entry in enumerate(f.grid):
        if not isinstance(entry, dict):
            raise InputError(f"{where}: field 'grid[{i}]' is {shown(entry)}; expected a mapping of grid keys")
        configs += expand(entry, f.defaults, f.options, f"{where}: grid[{i}]")
        if len(configs) > MAX_CONFIGS:
            raise InputError(f"{where}: the grid has more than {MAX_CONFIGS:,} configurations")
    seen, unique = set(), []
    for c in configs:
        if c.key not in seen:
            seen.add(c.key)
            unique.append(c)
    name = f.name or re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(where).stem)[:100] or "sweep"
    return Sweep(name=name, configs=order(unique), timeout_s=float(f.timeout_s), source=where)


def load_sweep(path: str | Path) -> Sweep:
    data = parse_yaml(read_text(path, "sweep file"), str(path))
    return from_mapping(data, str(path))


def _group(c: RunConfig) -> str:
    d = c.to_dict()
    d["settings"] = {k: v for k, v in d["settings"].items() if k not in ("batch", "seq")}
    return json.dumps(d, sort_keys=True)


def order(configs: list[RunConfig]) -> list[RunConfig]:
    """Groups (equal but for batch and seq) in first-seen order, each smallest batch, then seq, first."""
    first = {}
    for i, c in enumerate(configs):
        first.setdefault(_group(c), i)
    return sorted(configs, key=lambda c: (first[_group(c)], c.settings.batch, c.settings.seq))


def shard(configs: list[RunConfig], i: int, n: int) -> list[RunConfig]:
    if not (n >= 1 and 1 <= i <= n):
        raise InputError(f"shard {i}/{n}: use i/n with 1 <= i <= n")
    return configs[i - 1 :: n]


def _bigger_than_an_oom(c: RunConfig, ooms: dict[str, list[tuple[int, int, str]]]) -> str | None:
    for b, s, oom_id in ooms.get(_group(c), []):
        if c.settings.batch >= b and c.settings.seq >= s:
            return oom_id
    return None


def _base_record(c, outcome: str, error: str | None) -> dict:
    """A record for a configuration that left none of its own (crash, timeout, skipped)."""
    from .probes import git_commit, versions

    kind = getattr(c, "kind", "train")
    rec = {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "id": c.id,
        "key": c.key,
        "model": c.model,
        "settings": c.settings.to_dict(),
        "outcome": outcome,
        "error": error,
        "measured": {},
        "environment": {"versions": versions(), "git_commit": git_commit()},
    }
    if kind == "train":
        rec["run"] = asdict(c.options)
    else:
        rec["serving"] = {k: v for k, v in c.to_dict().items() if k not in ("settings", "model", "kind")}
    return rec


def run_one(c, timeout_s: float, workdir: Path) -> dict:
    """One configuration (a RunConfig or an InferBenchConfig) in a fresh `python -m qlora_bench.run.worker`
    process."""
    cfg_path, out_path = workdir / f"{c.key}.json", workdir / f"{c.key}.record.json"
    cfg_path.write_text(json.dumps(c.to_dict()))
    out_path.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_bench.run.worker", str(cfg_path), str(out_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return _base_record(c, "timeout", f"no result within {timeout_s:g} s")
    if out_path.is_file():
        return json.loads(out_path.read_text())
    rc = proc.returncode
    why = f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    tail = " | ".join((err or "").strip().splitlines()[-3:])[-500:]
    return _base_record(c, "crash", f"worker {why}: {tail}" if tail else f"worker {why}")


def _check_cpu(configs: list[RunConfig]) -> None:
    """Without a GPU, refuse (InputError) when a configuration would not fit in RAM or take ages on the CPU."""
    from ..profiles import resolve_model
    from .preflight import check_cpu, train_cost

    costs, specs = [], {}
    for c in configs:
        try:
            spec = specs.setdefault(c.model, resolve_model(c.model))
        except InputError:  # e.g. a hub id while offline: its worker records the error, the others run
            continue
        costs.append((train_cost(spec, c.settings, c.options.warmup + c.options.steps), c.name))
    check_cpu("sweep", costs)


def run_sweep(
    sweep: Sweep,
    out: Path,
    shard_spec: tuple[int, int] | None = None,
    progress: bool = True,
    on_record=None,
    cpu_check: bool = False,
) -> SweepSummary:
    """Run the configurations not yet in `out`. cpu_check: first refuse, without a GPU, configurations too big
    for the CPU (qlora-bench sweep without --yes)."""
    configs = shard(sweep.configs, *shard_spec) if shard_spec else sweep.configs
    done = {}
    if file_kind(out) != "missing":  # resume: every record checked, so a broken file stops the sweep up front
        for rec in load_records(out, kind=None):
            r = rec.data
            if r.get("key") and r.get("outcome") in FINAL_OUTCOMES:
                done[r["key"]] = r
    ooms: dict[str, list[tuple[int, int, str]]] = {}
    by_key = {c.key: c for c in sweep.configs}
    for r in done.values():
        if r["outcome"] == "oom" and r["key"] in by_key:
            c = by_key[r["key"]]
            ooms.setdefault(_group(c), []).append((c.settings.batch, c.settings.seq, c.id))
    todo = [c for c in configs if c.key not in done]
    if cpu_check:
        _check_cpu(todo)
    summary = SweepSummary(skipped_done=len(configs) - len(todo))

    from contextlib import nullcontext

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = (
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        if progress
        else nullcontext()
    )
    with bar, tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        task = bar.add_task(sweep.name, total=len(todo)) if progress else None
        for c in todo:
            if progress:
                bar.update(task, description=f"{sweep.name}: {c.name}")
            oom_id = _bigger_than_an_oom(c, ooms)
            if oom_id:
                rec = _base_record(c, "skipped_oom", f"not run: {oom_id} ran out of memory at a smaller batch/seq")
            else:
                t0 = time.time()
                rec = run_one(c, sweep.timeout_s, Path(tmp))
                rec.setdefault("run", {})["wall_seconds"] = round(time.time() - t0, 2)
            rec["sweep"] = sweep.name
            append_record(out, rec)
            if rec["outcome"] == "oom":
                ooms.setdefault(_group(c), []).append((c.settings.batch, c.settings.seq, c.id))
            summary.counts[rec["outcome"]] = summary.counts.get(rec["outcome"], 0) + 1
            summary.records.append(rec)
            if on_record:
                on_record(rec)
            if progress:
                bar.advance(task)
    return summary
