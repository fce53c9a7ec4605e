"""CPU benchmarks: replaying allocation traces through the caching-allocator model (estimate/allocator.py).

The traces are synthetic but shaped like a training step of a decoder (weights, then per layer: saved
activations and short-lived temporaries in the forward, the reverse in the backward with gradients, then the
optimizer), with sizes jittered so that blocks do not always fit back exactly.
"""

import random
from functools import cache

from qlora_bench.estimate.allocator import AllocatorConfig, replay

MiB = 1024**2


def training_trace(layers: int, steps: int, hidden: int = 4096, tokens: int = 2048, seed: int = 0) -> list:
    rng = random.Random(seed)
    ev: list = [("phase", "load")]
    key = 0

    def alloc(nbytes, tag):
        nonlocal key
        key += 1
        ev.append(("alloc", key, nbytes, tag))
        return key

    act = tokens * hidden * 2  # one bf16 activation
    weights = [alloc(hidden * hidden * 2 * rng.choice((1, 3, 4)) // 4, "weights") for _ in range(layers * 7)]
    small = [alloc(rng.randrange(1, 64) * 1024, "weights") for _ in range(layers * 2)]  # norms, biases
    grads_opt: list = []
    for step in range(steps):
        ev.append(("phase", f"forward{step}"))
        saved = []
        for _ in range(layers):
            for _ in range(6):
                saved.append(alloc(act * rng.choice((1, 1, 2, 3)) + rng.randrange(0, 8) * 512, "activations"))
                tmp = alloc(act * rng.choice((1, 2, 4)), "temporaries")
                tiny = alloc(rng.randrange(1, 256) * 256, "temporaries")
                ev.append(("free", tmp))
                ev.append(("free", tiny))
        logits = alloc(tokens * 128256 * 4, "logits")
        ev.append(("phase", f"backward{step}"))
        for j in reversed(range(len(saved))):
            g = alloc(act * rng.choice((1, 2)), "temporaries")
            ev.append(("free", saved[j]))
            if j % 6 == 0:
                grads_opt.append(alloc(hidden * hidden // 8, "gradients"))
            ev.append(("free", g))
        ev.append(("free", logits))
        ev.append(("phase", f"optimizer{step}"))
        if step == 0:
            grads_opt += [alloc(hidden * hidden // 4, "optimizer") for _ in range(layers * 2)]
        for _ in range(layers):
            ev.append(("free", alloc(hidden * hidden // 8, "temporaries")))
    ev += [("free", k) for k in weights + small]
    return ev


@cache
def trace_5k() -> list:
    return training_trace(layers=22, steps=4)  # 4,949 events


@cache
def trace_75k() -> list:
    return training_trace(layers=80, steps=18)  # 75,131 events


def test_trace_sizes():
    assert 4_000 < len(trace_5k()) < 6_000
    assert 70_000 < len(trace_75k()) < 80_000


def test_bench_replay_5k(benchmark):
    r = benchmark(replay, trace_5k())
    assert r.oom is None and r.peak_reserved >= r.peak_allocated
    assert benchmark.stats["mean"] < 0.05


def test_bench_replay_75k(benchmark):
    r = benchmark(replay, trace_75k(), timeline_points=200)
    assert r.oom is None and 0 < len(r.timeline) <= 200
    assert benchmark.stats["mean"] < 0.5


def test_bench_replay_75k_expandable(benchmark):
    r = benchmark(replay, trace_75k(), AllocatorConfig(expandable_segments=True))
    assert r.oom is None
    assert benchmark.stats["mean"] < 0.5


def test_bench_replay_75k_max_split(benchmark):
    r = benchmark(replay, trace_75k(), AllocatorConfig.parse("max_split_size_mb:128,roundup_power2_divisions:4"))
    assert r.oom is None
    assert benchmark.stats["mean"] < 0.5
