"""nox sessions. CPU: `nox -s tests lint bench_cpu heavy report`. GPU runners: `nox -s bench_gpu`, `nox -s sweep`.

Each session installs what it needs into its own venv. On CPU machines torch is pinned to the local CPU wheel
(torch==2.13.0); GPU sessions install the default (CUDA) torch wheel from PyPI.
"""

import os

import nox

nox.options.sessions = ["tests", "lint", "bench_cpu", "heavy"]
CONSTRAINTS = ("-c", "constraints/test.txt")


def _install_cpu(session: nox.Session, extras: str = "test") -> None:
    # torch first, pinned: on CPU machines torch==2.13.0 is a local CPU wheel; a looser pin downloads GBs.
    session.install("torch==2.13.0")
    session.install("-e", f".[{extras}]", *CONSTRAINTS)


def _install_gpu(session: nox.Session) -> None:
    session.install("torch")  # PyPI's default wheel is the CUDA build
    session.install("-e", ".[train,test,report]")


def _gpu_slug(session: nox.Session) -> str:
    return (
        session.run("python", "-c", "from qlora_bench.profiles import gpu_slug; print(gpu_slug())", silent=True)
        .strip()
        .splitlines()[-1]
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite (what CI runs)."""
    _install_cpu(session)
    session.run("pytest", "--benchmark-skip", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """More generated bad input than CI runs: nox -s fuzz (20,000 examples; QLORA_BENCH_FUZZ_EXAMPLES to change)."""
    _install_cpu(session)
    session.env.setdefault("QLORA_BENCH_FUZZ_EXAMPLES", os.environ.get("QLORA_BENCH_FUZZ_EXAMPLES", "20000"))
    session.env.setdefault("QLORA_BENCH_PROPERTY_EXAMPLES", os.environ.get("QLORA_BENCH_PROPERTY_EXAMPLES", "10"))
    session.env.setdefault("QLORA_BENCH_HYPOTHESIS_PROFILE", os.environ.get("QLORA_BENCH_HYPOTHESIS_PROFILE", "fuzz"))
    session.run("pytest", "tests/test_fuzz_inputs.py", "tests/test_properties.py", "-q", *session.posargs)


@nox.session
def heavy(session: nox.Session) -> None:
    """Tests marked `heavy` outside the benchmarks (a minute or more each, e.g. the calibration's left-out refits)."""
    _install_cpu(session)
    session.run("pytest", "tests", "--ignore", "tests/benchmarks", "-m", "heavy", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "qlora_bench", "tests", "noxfile.py")


@nox.session
def bench_cpu(session: nox.Session) -> None:
    """CPU benchmarks: the estimator, plan's search, loading and validating the committed results."""
    _install_cpu(session)
    session.run(
        "pytest",
        "tests/benchmarks",
        "-m",
        "not gpu",
        "--benchmark-only",
        "--benchmark-json",
        "bench-cpu.json",
        *session.posargs,
    )


@nox.session
def bench_gpu(session: nox.Session) -> None:
    """GPU benchmarks on this machine's GPU, compared with results/baselines/<gpu>.json when it exists.

    nox -s bench_gpu -- --throughput-tolerance 0.08     (extra pytest options)
    """
    _install_gpu(session)
    slug = _gpu_slug(session)
    if slug == "cpu":
        session.error("no NVIDIA GPU found: bench_gpu runs on GPU machines")
    baseline = f"results/baselines/{slug}.json"
    args = ["--compare-baseline", baseline] if os.path.isfile(baseline) else []
    if not args:
        session.warn(f"no baseline {baseline}: measuring only (create one with `qlora-bench baseline update`)")
    session.run(
        "pytest",
        "tests/benchmarks",
        "-m",
        "gpu",
        "--benchmark-only",
        "--benchmark-json",
        f"bench-gpu-{slug}.json",
        "--bench-results",
        f"results/{slug}/bench.jsonl",
        *args,
        *session.posargs,
    )


@nox.session
def sweep(session: nox.Session) -> None:
    """A named sweep on this machine's GPU: nox -s sweep -- sweeps/h100-standard.yaml [--shard 1/4]."""
    _install_gpu(session)
    if not session.posargs:
        session.error("give a sweep file: nox -s sweep -- sweeps/h100-standard.yaml")
    session.run("qlora-bench", "sweep", *session.posargs, "--no-progress")


@nox.session
def report(session: nox.Session) -> None:
    """Regenerate report/ from the committed results (Markdown + self-contained HTML)."""
    _install_cpu(session, extras="test,report")
    session.run("qlora-bench", "report", "results", "-o", "report")


@nox.session
def crosscheck(session: nox.Session) -> None:
    """The analytic estimator against `trace` on the full grid (CPU, about an hour on 2 cores; resumes where it
    stopped): writes results/crosscheck/grid.json and grid.md, which are committed."""
    _install_cpu(session)
    session.run(
        "qlora-bench",
        "crosscheck",
        "--grid",
        "full",
        "--jobs",
        os.environ.get("QLORA_BENCH_JOBS", "2"),
        *session.posargs,
    )
