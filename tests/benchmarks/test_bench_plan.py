"""CPU benchmarks: the estimator and plan's search (speed targets live here, not in unit tests).

Every round starts cold: estimate() memoizes its replays, and a warm cache would time a dictionary lookup.
"""

import pytest

from qlora_bench.estimate import _replayed, estimate
from qlora_bench.estimate.allocator import replay
from qlora_bench.estimate.program import program
from qlora_bench.estimate.steptime import step_blocks
from qlora_bench.plan import fastest, plan, rank_gpus
from qlora_bench.profiles import resolve_gpu, resolve_model
from qlora_bench.settings import Settings


def _cold():
    _replayed.cache_clear()
    step_blocks.cache_clear()


def test_bench_estimate_70b(benchmark):
    m = resolve_model("llama-3.1-70b")
    benchmark.pedantic(estimate, (m, Settings()), setup=_cold, rounds=5)
    # program + replay of a 70B step (136k events): 0.25 s on the 2-core CI machine
    assert benchmark.stats["mean"] < 0.6


def test_bench_replay_8b_step(benchmark):
    events = program(resolve_model("llama-3.1-8b"), Settings(), workspace=64 << 20)
    r = benchmark(replay, events)
    assert r.peak_reserved >= r.peak_allocated
    # issue 10's target is 50 ms; an 8B step is ~55k events and replays in 46-50 ms on a 2-core CPU (at the
    # target, not safely under it)
    assert benchmark.stats["mean"] < 0.15


def test_bench_plan_70b_48gb(benchmark):
    m, g = resolve_model("70b"), resolve_gpu("48gb")
    p = benchmark.pedantic(plan, (m, Settings(), g), setup=_cold, rounds=3)
    assert p.verdict == "does not fit"
    # issue 10's target is 0.3 s with the replay inside; today ~1.4 s (the verdict, the breakdown, each search's
    # answer and the deciding suggestion are replayed: 6 steps of ~135k events): not met, recorded
    assert benchmark.stats["mean"] < 3.0


def test_bench_step_time_70b(benchmark):
    """The step-time model alone: one layer's kernels composed in closed form, so a 70B step costs one layer."""
    from qlora_bench.estimate.overhead import overheads

    tm, m, g = overheads().throughput_model(), resolve_model("llama-3.1-70b"), resolve_gpu("h100")
    t = benchmark.pedantic(lambda: tm.step_seconds(m, Settings(), g), setup=_cold, rounds=20)
    assert t > 0 and benchmark.stats["mean"] < 0.02


def test_bench_plan_8b_with_time_and_cost(benchmark):
    """issue 11: `plan` with throughput and cost under 0.3 s (8B QLoRA on an H100, which fits: one replay)."""
    p = benchmark.pedantic(plan, (resolve_model("8b"), Settings(), resolve_gpu("h100")), setup=_cold, rounds=3)
    assert p.cost_usd and p.tokens_per_sec
    # issue 11 target: 0.3 s. Not met: the memory answer replays the step (~0.1 s for 8B) and each search (largest
    # batch, longest sequence) replays 2-3 neighbours; the step time itself takes ~1 ms. Measured ~0.6-0.8 s here.
    assert benchmark.stats["mean"] < 1.5


def test_bench_gpu_all(benchmark):
    """issue 11: `plan --gpu all` under 1 s (8B QLoRA at the default batch: one replay serves every card)."""
    from qlora_bench.profiles import gpu_names

    gpus = [resolve_gpu(n) for n in gpu_names()]
    r = benchmark.pedantic(rank_gpus, (resolve_model("8b"), Settings(), gpus, 10**8), setup=_cold, rounds=3)
    assert r[0].plan.fits
    assert benchmark.stats["mean"] < 2.0  # target 1 s


def test_bench_fastest(benchmark):
    """issue 11: `plan --fastest` under 2 s (8B QLoRA, global batch 8, on an H100)."""
    r = benchmark.pedantic(
        fastest, (resolve_model("8b"), Settings(batch=8), resolve_gpu("h100"), 10**8), setup=_cold, rounds=3
    )
    assert r[0].plan.fits
    assert benchmark.stats["mean"] < 4.0  # target 2 s


def test_bench_load_and_validate_committed_results(benchmark):
    from qlora_bench.results import RESULTS_DIR, load_records
    from qlora_bench.validate import validate

    rows, summaries = benchmark(lambda: validate(load_records(RESULTS_DIR)))
    assert summaries["all"].n >= 10


def _trace_or_skip():
    shim = pytest.importorskip("qlora_bench.trace.shim")
    if not shim.library_path().is_file() and shim.missing_tools():
        pytest.skip("no compiler for the fake-CUDA shim")
    from qlora_bench.trace import trace

    return trace


@pytest.mark.heavy
def test_bench_trace_8b(benchmark):
    """issue 10: an 8B step under 30 s, under 2 GB RSS (3 steps traced; the wall time includes imports)."""
    trace = _trace_or_skip()
    r = benchmark.pedantic(trace, (resolve_model("llama-3.1-8b"), Settings()), {"steps": 3}, rounds=1)
    benchmark.extra_info.update(seconds=r.seconds, max_rss_bytes=r.max_rss_bytes)
    assert max(r.seconds["steps"]) < 30 and r.max_rss_bytes < 2 * 2**30


@pytest.mark.heavy
def test_bench_trace_70b(benchmark):
    """issue 10: a 70B step under 90 s, under 2 GB RSS."""
    trace = _trace_or_skip()
    r = benchmark.pedantic(trace, (resolve_model("llama-3.1-70b"), Settings(seq=512)), {"steps": 2}, rounds=1)
    benchmark.extra_info.update(seconds=r.seconds, max_rss_bytes=r.max_rss_bytes)
    assert max(r.seconds["steps"]) < 90 and r.max_rss_bytes < 2 * 2**30
