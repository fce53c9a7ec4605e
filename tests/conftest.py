import os

import pytest
from hypothesis import Phase
from hypothesis import settings as hypothesis_settings

from qlora_bench.profiles import resolve_model

# The default test command (CI) draws the same examples every run, so a red CI means the change broke something
# rather than an unlucky draw; `nox -s fuzz` explores new examples on each run (and shrinks what it finds).
# No "explain" phase: it reruns a failing example under sys.settrace, which makes a plan about 10x slower, so the
# fuzz tests' 10 s hang guard fired on ordinary plans and reported a hang in place of the real failure.
PHASES = [p for p in Phase if p is not Phase.explain]
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True, phases=PHASES)
hypothesis_settings.register_profile("fuzz", derandomize=False, print_blob=True, phases=PHASES)
hypothesis_settings.load_profile(os.environ.get("QLORA_BENCH_HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    g = parser.getgroup("qlora-bench GPU benchmarks")
    g.addoption("--compare-baseline", default=None,
                help="after the GPU benchmarks, compare their records with this baseline (results/baselines/"
                     "<gpu>.json) and fail on a regression")
    g.addoption("--bench-results", default=None, help="append the GPU benchmark records to this .jsonl")
    g.addoption("--memory-tolerance", type=float, default=0.02)
    g.addoption("--throughput-tolerance", type=float, default=0.05)


def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark does not know the GPU: add it (and the library versions) to its machine info."""
    from qlora_bench.run.probes import try_nvml, versions

    nv = try_nvml()
    if nv is not None:
        import pynvml

        name = pynvml.nvmlDeviceGetName(nv.handle)
        machine_info["gpu"] = {"name": name.decode() if isinstance(name, bytes) else name,
                               "memory_total_bytes": nv.total(), "driver": nv.driver()}
    machine_info["qlora_bench_versions"] = versions()


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly without CUDA (torch may not even be installed)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def llama8b():
    return resolve_model("llama-3.1-8b")


@pytest.fixture(scope="session")
def llama1b():
    return resolve_model("llama-3.2-1b")
