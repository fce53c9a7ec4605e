"""CPU benchmarks: the estimator and plan's search (speed targets live here, not in unit tests)."""

from qlora_bench.estimate import estimate
from qlora_bench.plan import plan
from qlora_bench.profiles import resolve_gpu, resolve_model
from qlora_bench.settings import Settings


def test_bench_estimate(benchmark):
    m = resolve_model("llama-3.1-70b")
    benchmark(estimate, m, Settings())


def test_bench_plan_70b_48gb(benchmark):
    m, g = resolve_model("70b"), resolve_gpu("48gb")
    p = benchmark(plan, m, Settings(), g)
    assert p.verdict == "does not fit"
    # the front door must answer in well under a second
    assert benchmark.stats["mean"] < 0.25


def test_bench_load_and_validate_committed_results(benchmark):
    from qlora_bench.results import RESULTS_DIR, load_records
    from qlora_bench.validate import validate

    rows, summaries = benchmark(lambda: validate(load_records(RESULTS_DIR)))
    assert summaries["all"].n >= 10
