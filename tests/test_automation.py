"""The automation around the benchmarks: workflows are valid YAML that call real commands, and nox lists its
sessions."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


def test_there_are_three_workflows():
    assert {p.name for p in WORKFLOWS} == {"ci.yml", "gpu-bench.yml", "sweep.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_valid(path):
    wf = yaml.safe_load(path.read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert wf["name"] and on and wf["jobs"]
    for name, job in wf["jobs"].items():
        assert "runs-on" in job and job.get("steps"), name
        for step in job["steps"]:
            assert "uses" in step or "run" in step, (name, step)


def test_gpu_workflows_run_on_labelled_self_hosted_runners():
    for name in ("gpu-bench.yml", "sweep.yml"):
        wf = yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())
        gpu_jobs = [j for j in wf["jobs"].values() if isinstance(j["runs-on"], list)]
        assert gpu_jobs and all({"self-hosted", "gpu"} <= set(j["runs-on"]) for j in gpu_jobs)


def test_workflows_call_existing_nox_sessions_and_commands():
    import noxfile  # noqa: F401  (importable: the sessions are defined)

    text = "\n".join(p.read_text() for p in WORKFLOWS)
    for session in ("bench_gpu", "sweep"):
        assert f"-s {session}" in text
    for command in ("compare", "report", "results"):
        assert f"qlora-bench {command}" in text


@pytest.mark.skipif(not shutil.which("nox") and not (Path(sys.executable).parent / "nox").exists(),
                    reason="nox is not installed")
def test_nox_lists_sessions():
    nox = shutil.which("nox") or str(Path(sys.executable).parent / "nox")
    out = subprocess.run([nox, "-l"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    for s in ("tests", "lint", "fuzz", "bench_cpu", "bench_gpu", "sweep", "report"):
        assert f" {s}" in out
