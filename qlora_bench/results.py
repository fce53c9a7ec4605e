"""The results store: append-only JSONL, one record per measured configuration, with a schema version.

Everything downstream (tests, calibrate, later validate/report/compare) reads records through `load_records`.
`import_shared` brings the plain-HF-stack H100 measurements (shared/measurements/) into results/ with their
provenance, so a fresh clone has them; nothing is typed by hand.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from .errors import (
    InputError,
    check_output_file,
    file_kind,
    parse_json,
    read_text,
    shown,
    type_name,
    warn,
    write_text,
)
from .schema import Extra, load, rule
from .settings import Settings

SCHEMA_VERSION = 1
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def committed_results_dir() -> Path:
    """The measurements that come with qlora-bench (read-only): `results/` of a source checkout, or the copy a
    wheel ships as qlora_bench/_results (pyproject.toml)."""
    shipped = PACKAGE_DIR / "_results"
    return shipped if shipped.is_dir() else REPO_ROOT / "results"


RESULTS_DIR = committed_results_dir()


def default_results_dir() -> Path:
    """Where commands read results when given no path: ./results in the working directory when it holds result
    files (the user's own measurements; `baseline update` alone makes a ./results/baselines that holds none),
    else the measurements that come with qlora-bench."""
    here = Path("results")
    if file_kind(here) == "a folder" and any(here.rglob("*.jsonl")):
        return here
    return RESULTS_DIR


# ---- the record schema (one per record kind) ---------------------------------------------------------------
OUTCOMES = ("ok", "oom", "error", "crash", "timeout", "skipped_oom")
# Bounds of what one GPU process can measure: 4 TiB is 20x the largest board (B200: 192 GB); counts of
# parameters up to 10^14; throughput up to 10^9 tokens/s (an H100 trains ~10^4-10^5).
MAX_BYTES = 1 << 42
_BYTES = dict(ge=0, le=MAX_BYTES)
_COUNT = dict(ge=0, le=10**14)
_RATE = dict(gt=0, le=1e9)
_SECONDS = dict(ge=0, le=1e7)


@dataclass(frozen=True)
class MemorySnapshot:
    """torch's and NVML's counters at one point of a run (`mem_after_*`)."""

    extra = Extra.ALLOW
    allocated: int | None = rule(None, **_BYTES)
    reserved: int | None = rule(None, **_BYTES)
    max_allocated: int | None = rule(None, **_BYTES)
    max_reserved: int | None = rule(None, **_BYTES)
    nvml_used: int | None = rule(None, **_BYTES)


@dataclass(frozen=True)
class TrainMeasured:
    extra = Extra.ALLOW
    peak_allocated_bytes: int | None = rule(None, **_BYTES)
    peak_reserved_bytes: int | None = rule(None, **_BYTES)
    nvml_used_baseline_bytes: int | None = rule(None, **_BYTES, hint="NVML used on the idle GPU")
    nvml_peak_used_bytes: int | None = rule(None, **_BYTES)
    peak_device_bytes: int | None = rule(None, **_BYTES)
    optimizer_state_bytes: int | None = rule(None, **_BYTES)
    optimizer_state_paged_bytes: int | None = rule(None, **_BYTES)
    trainable_params: int | None = rule(None, **_COUNT)
    total_params: int | None = rule(None, **_COUNT)
    base_model_params: int | None = rule(None, **_COUNT)
    tokens_per_sec: float | None = rule(None, **_RATE)
    tokens_per_sec_min: float | None = rule(None, **_RATE)
    tokens_per_sec_max: float | None = rule(None, **_RATE)
    step_seconds: list[float] | None = rule(None, **_SECONDS)
    step_seconds_median: float | None = rule(None, gt=0, le=1e7)
    warmup_steps: int | None = rule(None, ge=0, le=10**7)
    timed_steps: int | None = rule(None, ge=0, le=10**7)
    losses: list[float | None] | None = None  # null: a diverged step (NaN / inf loss)
    mem_after_cuda_init: MemorySnapshot | None = None
    mem_after_model_build: MemorySnapshot | None = None
    mem_after_prepare_kbit: MemorySnapshot | None = None
    mem_after_load: MemorySnapshot | None = None
    mem_after_train: MemorySnapshot | None = None
    param_bytes_by_dtype_after_build: dict[str, int] | None = rule(None, **_BYTES)
    param_bytes_by_dtype_after_wrap: dict[str, int] | None = rule(None, **_BYTES)

    def check(self, where: str) -> None:
        """What a measurement cannot be: torch never reserves less than it allocates, NVML's peak includes the
        idle baseline and all that torch reserved, the paged states are part of all states, the median lies
        between min and max."""
        pairs = (
            ("peak_allocated_bytes", "peak_reserved_bytes"),
            ("nvml_used_baseline_bytes", "nvml_peak_used_bytes"),
            ("optimizer_state_paged_bytes", "optimizer_state_bytes"),
            # NVML sees every byte torch reserves (the cache is not released during a run), and the context more
            ("peak_reserved_bytes", "peak_device_bytes"),
            ("tokens_per_sec_min", "tokens_per_sec"),
            ("tokens_per_sec", "tokens_per_sec_max"),
        )
        for lo, hi in pairs:
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise InputError(f"{where}: {lo} ({a:,}) is larger than {hi} ({b:,}); expected at most {hi}")


@dataclass(frozen=True)
class Environment:
    extra = Extra.ALLOW
    gpu_name: str | None = rule(None, max_len=200)
    gpu_total_bytes: int | None = rule(None, ge=1, le=MAX_BYTES)
    nvml_total_bytes: int | None = rule(None, ge=1, le=MAX_BYTES)
    driver: str | None = rule(None, max_len=100)
    versions: dict[str, str | None] = rule(factory=dict, max_len=200)
    git_commit: str | None = rule(None, max_len=100)


@dataclass(frozen=True)
class _RecordFields:
    """The fields every record kind has; a kind narrows `kind` and `measured` (a redefined field keeps its
    place, so the required ones stay ahead of the optional ones)."""

    extra = Extra.ALLOW
    schema: Literal[SCHEMA_VERSION]
    kind: str
    id: str = rule(nonempty=True, max_len=500)
    model: str = rule(nonempty=True, max_len=4096)
    settings: Settings = rule()
    outcome: Literal[OUTCOMES] = rule()
    measured: dict = rule(hint="the measured figures ({} for a run that left none)")
    key: str | None = rule(None, max_len=100)
    error: str | None = rule(None, max_len=100_000)
    environment: Environment | None = None


@dataclass(frozen=True)
class TrainRecord(_RecordFields):
    """One measured training configuration (kind `train`): what `run` / `sweep` / `import-shared` write."""

    kind: Literal["train"]
    measured: TrainMeasured = rule(hint="the measured figures ({} for a run that left none)")
    architecture: dict | None = None

    def check(self, where: str) -> None:
        env, m = self.environment, self.measured
        total = env and (env.nvml_total_bytes or env.gpu_total_bytes)
        if total and m.nvml_used_baseline_bytes is not None and m.nvml_used_baseline_bytes > total:
            raise InputError(
                f"{where}: measured.nvml_used_baseline_bytes ({m.nvml_used_baseline_bytes:,}) is more than the "
                f"GPU's memory ({total:,}); expected the idle GPU's NVML `used`"
            )


@dataclass(frozen=True)
class InferRecord(_RecordFields):
    """One measured serving mode (kind `infer`, written by `infer-bench`); `measured` keys depend on the batch
    (decode_tokens_per_sec_b8), and every number in it is a byte count, seconds or a rate."""

    kind: Literal["infer"]
    serving: dict = rule(factory=dict)

    def check(self, where: str) -> None:
        def walk(value, path):
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(v, f"{path}.{k}")
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    walk(v, f"{path}[{i}]")
            elif isinstance(value, bool) or value is None or isinstance(value, str):
                return
            elif not 0 <= value <= MAX_BYTES:
                raise InputError(f"{where}: field '{path}' is {shown(value)}; expected a number in [0, 2^42]")

        walk(self.measured, "measured")


RECORD_KINDS = {"train": TrainRecord, "infer": InferRecord}


def check_record(data: object, where: str):
    """The typed record for one JSON object of a results file, or an InputError naming the line and field."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object (one result record per line), found {type_name(data)}")
    schema = data.get("schema")
    if schema != SCHEMA_VERSION or isinstance(schema, bool):
        raise InputError(
            f"{where}: field 'schema' is {shown(schema)}; expected {SCHEMA_VERSION} (a record written by another "
            "version of qlora-bench?)"
        )
    kind = data.get("kind")
    if kind not in RECORD_KINDS:
        raise InputError(f"{where}: field 'kind' is {shown(kind)}; expected one of {', '.join(RECORD_KINDS)}")
    return load(RECORD_KINDS[kind], data, where)


@dataclass(frozen=True)
class Record:
    data: dict
    path: Path
    line: int

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def model(self) -> str:
        return self.data["model"]

    @cached_property
    def settings(self) -> Settings:
        return Settings.from_dict(self.data["settings"], f"{self.path}:{self.line}: settings")

    def model_spec(self):
        """The model as it was measured: the config.json fields the record carries (`architecture`), else its
        name resolved as `--model` would resolve it. Errors name the record."""
        from .profiles import model_from_config, resolve_model

        arch = self.data.get("architecture")
        if arch:
            return model_from_config(arch, self.model, f"{self.path}:{self.line}: architecture")
        with self.context():
            return resolve_model(self.model)

    @contextmanager
    def context(self):
        """Bad input found while using this record (a model that does not resolve, LoRA targets the model lacks)
        names the record's file and line."""
        try:
            yield
        except InputError as e:
            if str(e).startswith(f"{self.path}:"):
                raise
            raise InputError(f"{self.path}:{self.line}: {e}") from None

    @property
    def ok(self) -> bool:
        return self.data.get("outcome") == "ok"

    @property
    def measured(self) -> dict:
        return self.data.get("measured") or {}


# ---- reading results files ---------------------------------------------------------------------------------
def result_files(path: str | Path) -> list[Path]:
    """The .jsonl files under `path` (a file, or a folder searched recursively without following links to
    folders). Entries that cannot be read as files (a FIFO, a folder named x.jsonl, a broken link, a link loop)
    are skipped with a warning: one bad entry must not hide the other results, nor hang the reader."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "missing":
        raise InputError(f"{path}: no such results file or folder")
    if kind is None:
        return [path]
    if kind != "a folder":
        raise InputError(f"{path}: expected a results .jsonl file or a folder of them, found {kind}")
    out = []
    for root, dirs, files in os.walk(path, onerror=lambda e: warn(f"{e.filename}: skipped ({e.strerror})")):
        for d in dirs:
            if d.endswith(".jsonl"):
                warn(f"{Path(root) / d}: skipped (a folder, not a results file)")
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(".jsonl"):
                continue
            f = Path(root) / name
            why = file_kind(f) or (None if os.access(f, os.R_OK) else "not readable")
            if why:
                warn(f"{f}: skipped ({why})")
            else:
                out.append(f)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [d for _, d in read_jsonl_lines(path)]


def read_jsonl_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, JSON object) of one .jsonl file. A torn last line (a writer killed mid-record: no final
    newline, a prefix of a JSON object) is skipped with a warning; any other line that is not a JSON object is an
    error naming the file and line."""
    text = read_text(path, "results file")
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        torn_candidate = n == len(lines) and line.lstrip().startswith("{")  # last line, no newline after it
        try:
            data = parse_json(line, where)
        except InputError:
            if torn_candidate:
                warn(f"{where}: incomplete last line skipped (a writer stopped mid-record)")
                continue
            raise
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object (one result record per line), found {type_name(data)}")
        out.append((n, data))
    return out


def load_records(path: str | Path | None = None, kind: str | None = "train") -> list[Record]:
    """All records under `path` (default: default_results_dir()), each checked against its kind's schema."""
    out = []
    for f in result_files(default_results_dir() if path is None else path):
        for n, data in read_jsonl_lines(f):
            check_record(data, f"{f}:{n}")
            if kind is None or data.get("kind") == kind:
                out.append(Record(data, f, n))
    return out


def to_dataframe(records: list[Record]):
    """One row per record with flattened settings, measured scalars and environment (needs pandas)."""
    try:
        import pandas as pd
    except ImportError:
        raise InputError("tables of results need pandas: pip install 'qlora-bench[train]'") from None
    rows = []
    for r in records:
        d = r.data
        row = {
            "id": d.get("id"),
            "key": d.get("key"),
            "model": d.get("model"),
            "outcome": d.get("outcome"),
            "error": d.get("error"),
            "file": str(r.path),
        }
        row.update({f"settings.{k}": v for k, v in d.get("settings", {}).items()})
        row.update(
            {
                f"measured.{k}": v
                for k, v in (d.get("measured") or {}).items()
                if v is None or isinstance(v, (int, float, str))
            }
        )
        env = d.get("environment") or {}
        row.update(
            {
                "gpu": env.get("gpu_name"),
                "driver": env.get("driver"),
                **{f"versions.{k}": v for k, v in (env.get("versions") or {}).items()},
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def merge(paths: list[Path], dest: Path) -> int:
    """Join result files (e.g. the shards of one sweep): one record per configuration key (the last one seen
    wins), in a stable order; records without a key are kept as they are. Every record is checked first."""
    by_key: dict[str, dict] = {}
    keyless = []
    for p in paths:
        for r in load_records(p, kind=None):
            if r.data.get("key"):
                by_key[r.data["key"]] = r.data
            else:
                keyless.append(r.data)
    out = keyless + sorted(by_key.values(), key=lambda d: (d.get("sweep") or "", d.get("id") or ""))
    write_text(dest, "".join(json.dumps(d, sort_keys=True) + "\n" for d in out), "merged results file")
    return len(out)


def _end_last_line(path: Path) -> None:
    """A writer killed mid-line leaves a last line without its newline. If that line is not a whole JSON
    object, cut it (that configuration was not recorded and runs again); if it is, end it with a newline; either
    way the next record starts on a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
            f.write(b"\n")
        except ValueError:
            f.truncate(start)


def append_record(path: Path, data: dict) -> None:
    """Append one record durably: a killed process loses at most the record being written. The record is checked
    against the schema first: what the runner writes, its own reader must accept."""
    check_record(data, f"record {data.get('id')!r} for {path}")
    path = check_output_file(path, "results file")
    line = json.dumps(data, sort_keys=True, allow_nan=False) + "\n"
    try:
        _end_last_line(path)
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise InputError(f"{path}: cannot append the record ({e.strerror or e})") from None


# ---- importing the shared H100 measurements --------------------------------------------------------------
_MEM_KEYS = (
    "mem_after_cuda_init",
    "mem_after_model_build",
    "mem_after_prepare_kbit",
    "mem_after_load",
    "mem_after_train",
)


def _settings_from_shared(r: dict, where: str) -> Settings:
    """The shared records' own fields, mapped onto Settings (see shared/measurements/README.md, 'How they were
    taken': LoRA on q,k,v,o,gate,up,down = all-linear for Llama, dropout 0.05, bf16 autocast,
    prepare_model_for_kbit_training for QLoRA, i.e. fp32 upcast)."""
    d = dict(
        method=r["method"],
        optimizer=r["optimizer"],
        batch=r["batch_size"],
        seq=r["seq_len"],
        gradient_checkpointing=r["gradient_checkpointing"],
        attn=r["attn_implementation"],
        compute_dtype="bf16",
        upcast_non_quantized=True,
        dropout=0.05,
        targets="all-linear",
    )
    if r["method"] != "full":
        d.update(rank=r["r"], alpha=r["lora_alpha"])
    if r["method"] == "qlora":
        d.update(quant=r["quant_type"], double_quant=r["double_quant"])
    return Settings.from_dict(d, f"{where}: settings")


def convert_shared_record(r: dict, source: str, line: int, driver: str | None) -> dict:
    """One shared measurement as a schema-1 record. Two kinds arrive: full records (memory and throughput) and
    throughput-only ones, whose memory figures were withheld (`measured_fields`): those get no memory fields."""
    baseline = r.get("nvml_used_baseline_bytes")
    peak = r.get("nvml_peak_used_bytes")
    measured = {
        "peak_allocated_bytes": r.get("peak_allocated_bytes"),
        "peak_reserved_bytes": r.get("peak_reserved_bytes"),
        "nvml_peak_used_bytes": peak,
        "nvml_used_baseline_bytes": baseline,
        # the process's own device footprint: NVML used minus what the idle GPU already used
        "peak_device_bytes": peak - baseline if isinstance(peak, int) and isinstance(baseline, int) else None,
        "optimizer_state_bytes": r.get("optimizer_state_bytes"),
        "optimizer_state_paged_bytes": r.get("optimizer_state_paged_bytes"),
        "trainable_params": r.get("trainable_params"),
        "total_params": r.get("total_params"),
        "base_model_params": r.get("base_model_params"),
        "param_bytes_by_dtype_after_build": r.get("param_bytes_by_dtype_after_build"),
        "param_bytes_by_dtype_after_wrap": r.get("param_bytes_by_dtype_after_wrap"),
        "tokens_per_sec": r.get("tokens_per_sec"),
        "step_seconds": r.get("step_seconds"),
        "step_seconds_median": r.get("step_seconds_median"),
        "warmup_steps": r.get("warmup_steps"),
        "timed_steps": r.get("timed_steps"),
        "losses": r.get("losses"),
        **{k: r.get(k) for k in _MEM_KEYS},
    }
    env = {
        "gpu_name": r.get("gpu_name"),
        "gpu_total_bytes": r.get("gpu_total_bytes"),
        "nvml_total_bytes": r.get("nvml_total_bytes"),
        "driver": driver,
        "versions": r.get("versions", {}),
    }
    where = f"{source}:{line}"
    out = {
        "schema": SCHEMA_VERSION,
        "kind": "train",
        "id": r["name"],
        "model": r["model"],
        "architecture": r.get("architecture"),
        "settings": _settings_from_shared(r, where).to_dict(),
        "outcome": "ok" if r.get("status") == "ok" else r.get("status", "error"),
        "measured": {k: v for k, v in measured.items() if v is not None or "measured_fields" not in r},
        "environment": env,
        "provenance": {
            "source": source,
            "line": line,
            "loader": r.get("loader"),
            "training_loop": r.get("training_loop"),
            "imported_by": "qlora-bench import-shared",
        },
    }
    if "measured_fields" in r:
        out["provenance"]["measured_fields"] = r["measured_fields"]
    check_record(out, where)
    return out


def shared_destination(src_file: Path, dest_dir: Path) -> Path:
    """results/<gpu>/<name>-shared.jsonl for shared/measurements/<gpu>-<name>.jsonl (h100-hf-stack.jsonl ->
    results/h100/hf-stack-shared.jsonl): one results file per source file, so each keeps its provenance."""
    stem = src_file.stem
    gpu = dest_dir.name
    if stem.startswith(f"{gpu}-"):
        stem = stem[len(gpu) + 1 :]
    return dest_dir / f"{stem}-shared.jsonl"


def import_shared(src: Path, dest_dir: Path) -> dict[Path, int]:
    """Convert shared/measurements/*.jsonl into schema-1 records in `dest_dir` (each file rewritten whole:
    deterministic). Returns {destination: records}."""
    src = Path(src)
    kind = file_kind(src)
    if kind == "missing":
        raise InputError(
            f"{src}: no such folder or file; give the shared measurements folder (e.g. ../shared/measurements)"
        )
    if kind not in (None, "a folder"):
        raise InputError(f"{src}: expected a folder of .jsonl measurement files or one such file, found {kind}")
    files = result_files(src) if kind == "a folder" else [src]
    files = [f for f in files if f.parent == src or kind is None]  # the folder's own files, not sub-folders
    if not files:
        raise InputError(f"{src}: no .jsonl measurement files there")
    readme = (src if kind == "a folder" else src.parent) / "README.md"
    driver = None
    if file_kind(readme) is None:
        m = re.search(r"driver\s+([\d.]+)", read_text(readme, "README"))
        driver = m.group(1) if m else None
    written = {}
    for f in files:
        out = []
        for n, r in read_jsonl_lines(f):
            try:
                out.append(convert_shared_record(r, f"shared/measurements/{f.name}", n, driver))
            except KeyError as e:
                raise InputError(f"{f}:{n}: missing field {e}; expected a shared measurement record") from None
            except TypeError:
                raise InputError(f"{f}:{n}: a field has the wrong type for a shared measurement record") from None
        dest = shared_destination(f, Path(dest_dir))
        write_text(dest, "".join(json.dumps(d, sort_keys=True) + "\n" for d in out), "results file")
        written[dest] = len(out)
    return written
