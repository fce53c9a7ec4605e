"""Runs one configuration in this (fresh) process and writes its record to a file.

    python -m qlora_bench.run.worker CONFIG.json RECORD.json

A sweep starts one worker per configuration so that memory peaks never leak between configurations; an OOM or
an error is written as the record's outcome, and a crash (segfault, CUDA error that kills the process) leaves no
record, which the sweep then records as a crash.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    cfg_path, out_path = Path(argv[0]), Path(argv[1])
    from ..profiles import resolve_model
    from . import probes
    from .config import RunConfig

    nvml = probes.try_nvml()  # before torch initialises CUDA: the baseline is the idle device
    data = json.loads(cfg_path.read_text())
    if data.get("kind") == "infer":
        from .infer import InferBenchConfig, run_infer

        cfg = InferBenchConfig.from_dict(data)
        record = run_infer(resolve_model(cfg.model), cfg, nvml=nvml)
    else:
        cfg = RunConfig.from_dict(data)
        from .train import run_config

        record = run_config(resolve_model(cfg.model), cfg.settings, cfg.options, cfg.id, nvml=nvml)
    record["key"] = cfg.key
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
