"""The results store: append-only JSONL, one record per measured configuration, with a schema version.

Everything downstream (tests, calibrate, later validate/report/compare) reads records through `load_records`.
`import_shared` brings the plain-HF-stack H100 measurements (shared/measurements/) into results/ with their
provenance, so a fresh clone has them; nothing is typed by hand.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .settings import Settings

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"


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

    @property
    def settings(self) -> Settings:
        return Settings.from_dict(self.data["settings"])

    def model_spec(self):
        """The model: its profile / config path when it resolves, else the config.json fields in the record."""
        from .profiles import model_from_config, resolve_model

        try:
            return resolve_model(self.model)
        except InputError:
            return model_from_config(self.data["architecture"], self.model, f"{self.path}:{self.line}")

    @property
    def ok(self) -> bool:
        return self.data.get("outcome") == "ok"

    @property
    def measured(self) -> dict:
        return self.data["measured"]


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*.jsonl"))
    if path.is_file():
        return [path]
    raise InputError(f"{path}: no such results file or folder")


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of one .jsonl file. A truncated last line (a writer killed mid-line) is skipped; a
    malformed line elsewhere is an error naming the file and line."""
    lines = Path(path).read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # torn final write
            raise InputError(f"{path}:{n}: not valid JSON") from None
    return out


def load_records(path: str | Path = RESULTS_DIR, kind: str | None = "train") -> list[Record]:
    """All records under `path` (a .jsonl file or a folder searched recursively), checked for the schema."""
    out = []
    for f in _jsonl_files(Path(path)):
        for n, data in enumerate(read_jsonl(f), 1):
            if data.get("schema") != SCHEMA_VERSION:
                raise InputError(f"{f}: record {n}: schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
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
    wins), in a stable order; records without a key are kept as they are."""
    by_key: dict[str, dict] = {}
    keyless = []
    for p in paths:
        for f in _jsonl_files(Path(p)):
            for d in read_jsonl(f):
                if d.get("key"):
                    by_key[d["key"]] = d
                else:
                    keyless.append(d)
    out = keyless + sorted(by_key.values(), key=lambda d: (d.get("sweep") or "", d.get("id") or ""))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in out))
    return len(out)


def _drop_torn_tail(path: Path) -> None:
    """A writer killed mid-line leaves a last line without its newline: cut it, so the next record starts on a
    line of its own (that configuration was not recorded and runs again)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def append_record(path: Path, data: dict) -> None:
    """Append one record durably: a killed process loses at most the record being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    with open(path, "a") as f:
        f.write(json.dumps(data, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- importing the shared H100 measurements --------------------------------------------------------------
_MEM_KEYS = (
    "mem_after_cuda_init",
    "mem_after_model_build",
    "mem_after_prepare_kbit",
    "mem_after_load",
    "mem_after_train",
)


def _settings_from_shared(r: dict) -> Settings:
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
    return Settings(**d).validated()


def convert_shared_record(r: dict, source: str, line: int, driver: str | None) -> dict:
    baseline = r["nvml_used_baseline_bytes"]
    measured = {
        "peak_allocated_bytes": r["peak_allocated_bytes"],
        "peak_reserved_bytes": r["peak_reserved_bytes"],
        "nvml_peak_used_bytes": r["nvml_peak_used_bytes"],
        "nvml_used_baseline_bytes": baseline,
        # the process's own device footprint: NVML used minus what the idle GPU already used
        "peak_device_bytes": r["nvml_peak_used_bytes"] - baseline if r["nvml_peak_used_bytes"] else None,
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
    return {
        "schema": SCHEMA_VERSION,
        "kind": "train",
        "id": r["name"],
        "model": r["model"],
        "architecture": r.get("architecture"),
        "settings": _settings_from_shared(r).to_dict(),
        "outcome": "ok" if r.get("status") == "ok" else r.get("status", "error"),
        "measured": measured,
        "environment": env,
        "provenance": {
            "source": source,
            "line": line,
            "loader": r.get("loader"),
            "training_loop": r.get("training_loop"),
            "imported_by": "qlora-bench import-shared",
        },
    }


def import_shared(src: Path, dest: Path) -> int:
    """Convert shared/measurements/*.jsonl into schema-1 records at `dest` (rewritten whole: deterministic)."""
    src = Path(src)
    files = sorted(src.glob("*.jsonl")) if src.is_dir() else [src]
    if not files:
        raise InputError(f"{src}: no .jsonl measurement files")
    readme = (src if src.is_dir() else src.parent) / "README.md"
    driver = None
    if readme.is_file():
        m = re.search(r"driver\s+([\d.]+)", readme.read_text())
        driver = m.group(1) if m else None
    out = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                out.append(convert_shared_record(json.loads(line), f"shared/measurements/{f.name}", n, driver))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in out))
    return len(out)
