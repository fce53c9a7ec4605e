"""A new user's install: non-editable `pip install .` into a fresh venv, run from a folder outside the clone.

The profiles and the committed measurements live at the repository's top level and must ship inside the wheel;
the base install must plan without torch; and every README command that needs no GPU must work from there,
writing its output into the user's folder, never into site-packages.
"""

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "QLORA_BENCH_CALIBRATION")}
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", f"{REPO}[report]"], check=True, env=env, cwd=tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    site = Path(subprocess.run([py, "-c", "import qlora_bench, os; print(os.path.dirname(qlora_bench.__file__))"],
                               capture_output=True, text=True, check=True, env=env, cwd=elsewhere).stdout.strip())
    return env_dir / "bin" / "qlora-bench", py, env, elsewhere, site


def _run(fresh_install, *args, code=0):
    exe, _, env, cwd, _ = fresh_install
    r = subprocess.run([exe, *args], capture_output=True, text=True, env={**env, "COLUMNS": "200"}, cwd=cwd)
    assert r.returncode == code, (args, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    return r.stdout


@pytest.mark.slow
def test_plan_from_the_base_install_needs_no_torch(fresh_install):
    _, py, env, elsewhere, site = fresh_install
    out = _run(fresh_install, "plan", "--model", "70b", "--gpu", "48gb")
    assert "llama-3.1-70b" in out and "DOES NOT FIT" in out
    assert "mixtral-8x7b" in _run(fresh_install, "profiles")
    probe = "import importlib.util, qlora_bench.profiles as p; print(importlib.util.find_spec('torch') is None)"
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True, env=env, cwd=elsewhere)
    assert out.stdout.strip() == "True"
    assert (site / "_profiles").is_dir() and str(REPO) not in str(site)


@pytest.mark.slow
def test_readme_workflow_writes_into_the_users_folder(fresh_install):
    """validate, calibrate, plan --calibration, baseline update, compare, results, report, as the README shows
    them, from a folder outside the clone: outputs land there and the installed package is untouched."""
    _, _, _, cwd, site = fresh_install
    before = _files(site)
    # with no results/ here, validate reads the measurements that ship with the package
    out = _run(fresh_install, "validate")
    assert "records:" in out and "_results" in out and "false fits" in out
    shutil.copytree(REPO / "results", cwd / "my-results")
    assert "held-out" in _run(fresh_install, "validate", "my-results")
    out = _run(fresh_install, "calibrate", "my-results", "--out", "cal.json")
    assert "wrote cal.json" in out and json.loads((cwd / "cal.json").read_text())["fitted_on"]
    assert "FITS" in _run(fresh_install, "plan", "--model", "8b", "--gpu", "24gb", "--calibration", "cal.json")
    assert "results/baselines/h100.json" in _run(fresh_install, "baseline", "update", "my-results/h100")
    assert (cwd / "results" / "baselines" / "h100.json").is_file()
    assert "no regression" in _run(fresh_install, "compare", "my-results/h100", "results/baselines/h100.json")
    assert "records" in _run(fresh_install, "results", "my-results")
    out = _run(fresh_install, "report", "my-results", "-o", "my-report")
    assert (cwd / "my-report" / "README.md").is_file() and (cwd / "my-report" / "report.html").is_file()
    # calibrate never overwrites the installed package's calibration; nothing else is written there either
    err = _run(fresh_install, "calibrate", "my-results", "--out", str(site / "calibration.json"), code=2)
    assert err == ""
    assert _files(site) == before


@pytest.mark.slow
def test_missing_inputs_are_one_line_errors(fresh_install):
    exe, _, env, cwd, _ = fresh_install
    for args in (["import-shared", "../shared/measurements"], ["validate", "nowhere"], ["calibrate", "nowhere"]):
        r = subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=cwd)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
