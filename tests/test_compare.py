"""Regression comparison on synthetic baselines, and baseline creation from committed records."""

import copy
import json

import pytest

from qlora_bench.cli import main
from qlora_bench.compare import Tolerances, baseline_from_records, compare, load_side
from qlora_bench.errors import InputError
from qlora_bench.results import RESULTS_DIR, load_records

GiB = 1024**3


def _baseline(**over):
    b = {
        "schema": 1, "gpu": "NVIDIA H100 80GB HBM3", "driver": "580", "provenance": {},
        "versions": {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.50.2"},
        "configs": {
            "k1": {"id": "8b/qlora", "outcome": "ok", "peak_allocated_bytes": 12 * GiB,
                   "peak_reserved_bytes": 13 * GiB, "peak_device_bytes": 14 * GiB, "tokens_per_sec": 3000.0,
                   "tokens_per_sec_spread": 0.02},
            "k2": {"id": "1b/lora", "outcome": "ok", "peak_allocated_bytes": 8 * GiB,
                   "peak_reserved_bytes": 10 * GiB, "peak_device_bytes": 11 * GiB, "tokens_per_sec": 17000.0,
                   "tokens_per_sec_spread": 0.20},
        },
    }
    b.update(over)
    return b


def _status(cmp, config, metric):
    return next(c.status for c in cmp.changes if c.config == config and c.metric == metric)


def test_identical_is_ok():
    cmp = compare(_baseline(), _baseline())
    assert not cmp.failed and {c.status for c in cmp.changes} == {"ok"}


def test_memory_regression_and_improvement():
    new = _baseline()
    new["configs"]["k1"]["peak_device_bytes"] = int(14 * GiB * 1.03)  # +3 % > 2 %
    new["configs"]["k2"]["peak_allocated_bytes"] = int(8 * GiB * 0.9)
    cmp = compare(new, _baseline())
    assert cmp.failed and _status(cmp, "8b/qlora", "peak_device_bytes") == "regression"
    assert _status(cmp, "1b/lora", "peak_allocated_bytes") == "improved"
    assert not compare(new, _baseline(), Tolerances(memory=0.05)).failed  # configurable


def test_throughput_drop_within_measured_noise_passes():
    new = _baseline()
    new["configs"]["k2"]["tokens_per_sec"] = 17000 * 0.88  # -12 %: beyond 5 %, within the 20 % spread
    new["configs"]["k1"]["tokens_per_sec"] = 3000 * 0.90  # -10 %: beyond 5 % and beyond the 2 % spread
    cmp = compare(new, _baseline())
    assert _status(cmp, "1b/lora", "tokens_per_sec") == "within noise"
    assert _status(cmp, "8b/qlora", "tokens_per_sec") == "regression"


def test_missing_configuration_and_new_one():
    new = _baseline()
    new["configs"]["k3"] = copy.deepcopy(new["configs"].pop("k2")) | {"id": "70b/qlora"}
    cmp = compare(new, _baseline())
    assert _status(cmp, "1b/lora", "configuration") == "missing" and cmp.failed
    assert _status(cmp, "70b/qlora", "configuration") == "new"
    assert not compare(new, _baseline(), allow_missing=True).failed


def test_outcome_turning_into_oom_is_a_regression():
    new = _baseline()
    new["configs"]["k1"]["outcome"] = "oom"
    assert _status(compare(new, _baseline()), "8b/qlora", "outcome") == "regression"


def test_different_gpu_refused():
    with pytest.raises(InputError, match="same GPU model"):
        compare(_baseline(gpu="NVIDIA A100-SXM4-80GB"), _baseline())


def test_different_library_versions_flagged_not_failed():
    new = _baseline(versions={"torch": "2.12.0", "transformers": "5.17.0", "peft": "0.21.0",
                              "bitsandbytes": "0.51.0"})
    cmp = compare(new, _baseline())
    assert cmp.version_differences == {"torch": ["2.11.0", "2.12.0"], "bitsandbytes": ["0.50.2", "0.51.0"]}
    assert not cmp.failed


def test_baseline_from_committed_records_and_cli_exit_codes(tmp_path, capsys):
    records = load_records(RESULTS_DIR / "h100")
    b = baseline_from_records(records, source="results/h100")
    assert b["gpu"] == "NVIDIA H100 80GB HBM3" and len(b["configs"]) == len(records)
    # the spread comes from the records' own step times when they carry no min/max
    assert all(c["tokens_per_sec_spread"] is not None for c in b["configs"].values())
    base = tmp_path / "h100.json"
    base.write_text(json.dumps(b))
    assert load_side(base)["configs"] == b["configs"]
    assert main(["compare", str(RESULTS_DIR / "h100"), str(base)]) == 0
    worse = copy.deepcopy(b)
    for c in worse["configs"].values():
        if c["peak_device_bytes"]:  # throughput-only records carry no memory
            c["peak_device_bytes"] = int(c["peak_device_bytes"] * 0.9)  # the baseline used 10 % less
    (tmp_path / "better.json").write_text(json.dumps(worse))
    assert main(["compare", str(RESULTS_DIR / "h100"), str(tmp_path / "better.json")]) == 1
    capsys.readouterr()
    assert main(["compare", str(RESULTS_DIR / "h100"), str(tmp_path / "better.json"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["failed"] is True


def test_baseline_update_refuses_a_dirty_tree(tmp_path, monkeypatch):
    from qlora_bench import compare as cmp_mod

    monkeypatch.setattr(cmp_mod, "git_state", lambda: ("abc123", False))
    with pytest.raises(InputError, match="not clean"):
        cmp_mod.update_baseline(RESULTS_DIR / "h100", tmp_path / "b.json")
    monkeypatch.setattr(cmp_mod, "git_state", lambda: ("abc123", True))
    dest = cmp_mod.update_baseline(RESULTS_DIR / "h100", tmp_path / "b.json")
    assert json.loads(dest.read_text())["provenance"]["commit"] == "abc123"
