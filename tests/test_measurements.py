"""The estimator against the committed H100 measurements (results/), and the calibration's reproducibility.

Tolerances are what the model honestly reaches today (issue 4 tightens them to 5% median / 10% worst on the
device peak): the allocated peak within 1% everywhere; the device peak within 3% for LoRA/QLoRA; full
fine-tuning's allocator slack is the least understood term (within 16%), and every measured device peak must
lie inside the estimate's band.
"""

import json
import statistics
from pathlib import Path

import pytest

from qlora_bench.calibration import fit
from qlora_bench.estimate import estimate
from qlora_bench.estimate.overhead import CALIBRATION_FILE
from qlora_bench.profiles import resolve_model
from qlora_bench.results import RESULTS_DIR, import_shared, load_records

RECORDS = [r for r in load_records() if r.ok and r.measured.get("peak_device_bytes")]  # GPU records
SHARED = Path(__file__).resolve().parents[2] / "shared" / "measurements"


def test_there_are_committed_records():
    assert len(RECORDS) >= 10
    assert {r.settings.method for r in RECORDS} == {"full", "lora", "qlora"}


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: r.id)
def test_estimate_vs_measured(rec):
    e = estimate(rec.model_spec(), rec.settings)
    m = rec.measured
    err_alloc = e.peak_allocated_bytes / m["peak_allocated_bytes"] - 1
    err_dev = e.peak_device_bytes / m["peak_device_bytes"] - 1
    print(f"{rec.id}: allocated {err_alloc:+.2%}, device {err_dev:+.2%}")
    assert abs(err_alloc) <= 0.01
    assert abs(err_dev) <= (0.16 if rec.settings.method == "full" else 0.03)
    if rec.id in e.overheads.fitted_on:  # held-out records need not fall inside a band fitted without them
        assert e.device_low_bytes <= m["peak_device_bytes"] <= e.device_high_bytes


def test_median_device_error():
    errs = [
        abs(estimate(r.model_spec(), r.settings).peak_device_bytes / r.measured["peak_device_bytes"] - 1)
        for r in RECORDS
    ]
    print(f"device peak error: median {statistics.median(errs):.2%}, worst {max(errs):.2%}")
    assert statistics.median(errs) <= 0.02


def test_validate_summary_meets_the_targets_it_can():
    """Issue 4's targets on the H100 records: median device error <= 5 % (met), zero false fits (met), worst
    <= 10 % (met for LoRA/QLoRA; full fine-tuning's allocator slack is off by up to ~13 %, see README)."""
    from qlora_bench.validate import summarize, validate

    rows, summaries = validate(load_records())
    assert summaries["all"].false_fits == 0
    assert summaries["all"].median_abs_error["peak_device_bytes"] <= 0.05
    assert summaries["held-out"].n >= 1 and summaries["fitted"].n >= 1
    adapters = summarize([x for x in rows if x.record.settings.method != "full"])
    assert adapters.worst_abs_error["peak_device_bytes"] <= 0.03
    assert summaries["all"].worst_abs_error["peak_device_bytes"] <= 0.16


def test_record_architecture_matches_profile():
    for r in RECORDS:
        spec = resolve_model(r.model)
        arch = r.data["architecture"]
        assert (
            spec.hidden_size,
            spec.intermediate_size,
            spec.num_layers,
            spec.num_kv_heads,
            spec.vocab_size,
            spec.tie_word_embeddings,
        ) == (
            arch["hidden_size"],
            arch["intermediate_size"],
            arch["num_hidden_layers"],
            arch["num_key_value_heads"],
            arch["vocab_size"],
            arch["tie_word_embeddings"],
        )
        assert r.measured["base_model_params"] == spec.total_params


def test_committed_calibration_is_a_fresh_fit():
    """Everything `calibrate` writes, refitted from the committed records, except the step-time leave-one-out
    errors (20 refits, about a minute: the heavy test below refits those too)."""
    from qlora_bench.crosscheck import read_rows

    committed = json.loads(CALIBRATION_FILE.read_text())
    grid = read_rows(RESULTS_DIR / "crosscheck" / "grid.json")
    fresh = fit(load_records(RESULTS_DIR), crosscheck_rows=grid, leave_one_out=False)
    for gpu, st in committed["step_time"].items():
        loo = st.pop("loo_rel_error")
        assert set(loo) == set(st["rel_error"]), gpu  # every record with a step time has its left-out error
    assert fresh == committed


@pytest.mark.heavy
def test_committed_calibration_is_a_fresh_fit_with_left_out_errors():
    from qlora_bench.crosscheck import read_rows

    committed = json.loads(CALIBRATION_FILE.read_text())
    grid = read_rows(RESULTS_DIR / "crosscheck" / "grid.json")
    assert fit(load_records(RESULTS_DIR), crosscheck_rows=grid) == committed


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/measurements not beside this checkout")
def test_import_is_reproducible(tmp_path):
    """Every shared measurement file imports into the committed results file of the same name, byte for byte."""
    written = import_shared(SHARED, tmp_path / "h100")
    assert {p.name for p in written} == {"hf-stack-shared.jsonl", "throughput-shared.jsonl"}
    for path in written:
        assert path.read_text() == (RESULTS_DIR / "h100" / path.name).read_text()


def test_throughput_only_records_carry_no_memory():
    """The shared throughput-only records (memory withheld) import without memory fields, so memory validation and
    calibration never see them; their step times are there."""
    recs = load_records(RESULTS_DIR / "h100" / "throughput-shared.jsonl")
    assert len(recs) >= 9
    for r in recs:
        assert r.ok and r.measured["tokens_per_sec"] > 0 and r.measured["step_seconds"]
        assert "peak_device_bytes" not in r.measured and "peak_allocated_bytes" not in r.measured


def test_truncated_last_line_is_tolerated(tmp_path):
    src = (RESULTS_DIR / "h100" / "hf-stack-shared.jsonl").read_text()
    f = tmp_path / "r.jsonl"
    f.write_text(src + src.splitlines()[0][:100])
    assert len(load_records(f)) == len(src.splitlines())


def test_garbage_last_line_is_not_mistaken_for_a_torn_one(tmp_path):
    from qlora_bench.errors import InputError

    src = (RESULTS_DIR / "h100" / "hf-stack-shared.jsonl").read_text()
    f = tmp_path / "r.jsonl"
    for tail in ("hello world", "hello world\n", "{not json\n"):
        f.write_text(src + tail)
        with pytest.raises(InputError, match=f"{f.name}:{len(src.splitlines()) + 1}"):
            load_records(f)
    f.write_text("garbage\n")
    with pytest.raises(InputError, match="not valid JSON"):
        load_records(f)


def _records_with(tmp_path, change):
    """The committed H100 records with `change(record)` applied to each, in a results file of their own."""
    lines = (RESULTS_DIR / "h100" / "hf-stack-shared.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        d = json.loads(line)
        change(d)
        out.append(json.dumps(d))
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(out) + "\n")
    return f


@pytest.mark.parametrize(
    "change,needle",
    [
        # a negative idle baseline used to fit a driver reservation of -931 GiB, after which 70B "fit" in 24 GB
        (lambda d: d["measured"].update(nvml_used_baseline_bytes=-(10**12)), "nvml_used_baseline_bytes"),
        # NVML's peak below torch's reserved peak: the figures contradict each other
        (
            lambda d: d["measured"].update(peak_device_bytes=d["measured"]["peak_reserved_bytes"] // 2),
            "peak_reserved_bytes",
        ),
        # a record the formulas do not describe (allocated peak halved) must not bend the fitted constants
        (
            lambda d: d["measured"].update(
                peak_allocated_bytes=d["measured"]["peak_allocated_bytes"] // 2,
                peak_reserved_bytes=d["measured"]["peak_reserved_bytes"] // 2,
                peak_device_bytes=d["measured"]["peak_device_bytes"] // 2,
            ),
            "cannot calibrate",
        ),
    ],
)
def test_calibrate_refuses_contradictory_records(tmp_path, change, needle):
    from qlora_bench.calibration import calibrate
    from qlora_bench.errors import InputError

    with pytest.raises(InputError, match=needle):
        calibrate(_records_with(tmp_path, change), tmp_path / "cal.json")
    assert not (tmp_path / "cal.json").exists()


def test_calibrate_on_nothing_is_one_line(tmp_path, capsys):
    from qlora_bench.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["calibrate", str(tmp_path / "empty"), "--out", str(tmp_path / "cal.json")]) == 2
    assert "no successful GPU records" in capsys.readouterr().err


def test_a_calibration_file_is_checked_before_use(tmp_path, capsys):
    from qlora_bench.cli import main

    cal = json.loads(CALIBRATION_FILE.read_text())
    cal["driver_idle_bytes"]["value"] = -(10**12)
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    assert main(["plan", "--model", "70b", "--gpu", "24gb", "--calibration", str(tmp_path / "cal.json")]) == 2
    err = capsys.readouterr().err
    assert "driver_idle_bytes.value" in err and len(err.strip().splitlines()) == 1
