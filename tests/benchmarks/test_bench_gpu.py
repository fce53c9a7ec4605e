"""GPU benchmarks: reference configurations through the same runner as `sweep` (each in a fresh process),
peak memory and tokens/s in `benchmark.extra_info`, and a comparison with the GPU's committed baseline.

    pytest tests/benchmarks -m gpu --benchmark-only --bench-results results/<gpu>/bench.jsonl \\
        --compare-baseline results/baselines/<gpu>.json

Skipped cleanly without CUDA (tests/conftest.py).
"""

from pathlib import Path

import pytest

from qlora_bench.settings import DEFAULT_OPTIMIZER, Settings

REFERENCE = [  # (model, method, batch, seq): small and fast, yet covering all three methods and 4-bit 8B
    ("llama-3.2-1b", "full", 4, 1024),
    ("llama-3.2-1b", "lora", 4, 1024),
    ("llama-3.2-1b", "qlora", 4, 1024),
    ("llama-3.1-8b", "qlora", 1, 512),
    ("llama-3.1-8b", "qlora", 1, 2048),
]
RECORDS: list[dict] = []


def reference_configs():
    from qlora_bench.run.config import RunConfig
    from qlora_bench.run.train import RunOptions

    return [RunConfig(model, Settings(method=method, batch=b, seq=s, optimizer=DEFAULT_OPTIMIZER[method]),
                      RunOptions(steps=10, warmup=3, min_seconds=5.0)) for model, method, b, s in REFERENCE]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", reference_configs(), ids=lambda c: c.name)
def test_bench_gpu(benchmark, cfg, request, tmp_path):
    from qlora_bench.results import append_record
    from qlora_bench.run.sweep import run_one

    rec = benchmark.pedantic(run_one, args=(cfg, 1200, tmp_path), rounds=1, iterations=1)
    rec["key"] = cfg.key
    m = rec.get("measured") or {}
    benchmark.extra_info.update({k: m.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes",
                                                       "peak_device_bytes", "tokens_per_sec",
                                                       "tokens_per_sec_min", "tokens_per_sec_max")})
    benchmark.extra_info["outcome"] = rec["outcome"]
    RECORDS.append(rec)
    out = request.config.getoption("--bench-results")
    if out:
        append_record(Path(out), rec)
    assert rec["outcome"] == "ok", rec.get("error")


@pytest.mark.gpu
def test_no_regression_against_baseline(request):
    """Runs after the benchmarks above (file order): their records against the committed baseline."""
    baseline = request.config.getoption("--compare-baseline")
    if not baseline:
        pytest.skip("no --compare-baseline given")
    from qlora_bench.compare import Tolerances, baseline_from_records, compare, load_baseline
    from qlora_bench.results import Record

    assert RECORDS, "the GPU benchmarks produced no records"
    new = baseline_from_records([Record(r, Path("session"), i) for i, r in enumerate(RECORDS)], source="session")
    cmp = compare(new, load_baseline(Path(baseline)),
                  Tolerances(request.config.getoption("--memory-tolerance"),
                             request.config.getoption("--throughput-tolerance")))
    bad = [f"{c.config} {c.metric}: {c.change and f'{c.change:+.1%}'} ({c.status})" for c in cmp.regressions]
    assert not bad, "regressions against the baseline:\n" + "\n".join(bad)
