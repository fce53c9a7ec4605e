"""A new user's install: non-editable `pip install .` into a fresh venv, run from another folder.

The profiles live at the repository's top level and must ship inside the wheel; the base install must plan
without torch.
"""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fresh_venv_install_finds_profiles(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([py, "-m", "pip", "install", "-q", str(REPO)], check=True, env=env, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exe = env_dir / "bin" / "qlora-bench"
    out = subprocess.run([exe, "plan", "--model", "70b", "--gpu", "48gb"], capture_output=True, text=True,
                         check=True, env=env, cwd=elsewhere).stdout
    assert "llama-3.1-70b" in out and "DOES NOT FIT" in out
    out = subprocess.run([exe, "profiles"], capture_output=True, text=True, check=True, env=env, cwd=elsewhere)
    assert "mixtral-8x7b" in out.stdout
    # the base install has no torch, and the installed package reads its own copy of the profiles
    probe = ("import importlib.util, qlora_bench.profiles as p; "
             "print(importlib.util.find_spec('torch') is None, p.profiles_dir())")
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True, env=env, cwd=elsewhere)
    no_torch, where = out.stdout.split()
    assert no_torch == "True" and "_profiles" in where and str(REPO) not in where
    assert sys.executable  # (the test venv itself is untouched)
