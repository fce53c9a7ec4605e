"""nox sessions: `nox -s tests`, `nox -s lint`, `nox -s bench_cpu`."""

import nox

nox.options.sessions = ["tests", "lint"]
CONSTRAINTS = ("-c", "constraints/test.txt")


def _install_test(session: nox.Session) -> None:
    # torch first, pinned: on CPU machines torch==2.13.0 is a local CPU wheel; a looser pin downloads GBs.
    session.install("torch==2.13.0")
    session.install("-e", ".[test]", *CONSTRAINTS)


@nox.session
def tests(session: nox.Session) -> None:
    _install_test(session)
    session.run("pytest", "--benchmark-skip", *session.posargs)


@nox.session
def bench_cpu(session: nox.Session) -> None:
    _install_test(session)
    session.run("pytest", "tests/benchmarks", "--benchmark-only", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "qlora_bench", "tests", "noxfile.py")
