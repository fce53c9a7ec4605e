"""infer-bench on CPU: every serving mode runs in a fresh process and leaves an `infer` record."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qlora_bench.results import load_records, read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "data" / "tiny-llama")


def test_infer_bench_all_modes(tmp_path):
    out = tmp_path / "infer.jsonl"
    r = subprocess.run([sys.executable, "-m", "qlora_bench", "infer-bench", "--model", TINY, "--batch", "2",
                        "--prompt", "32", "--new-tokens", "4", "--adapters", "3", "--repeats", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_jsonl(out)
    assert [d["serving"]["mode"] for d in recs] == ["base16", "adapters4", "merged16", "merged4", "switch"]
    assert all(d["kind"] == "infer" and d["outcome"] == "ok" for d in recs), [d.get("error") for d in recs]
    for d in recs:
        m = d["measured"]
        assert m["prefill_seconds_b1"] > 0 and m["decode_tokens_per_sec_b1"] > 0 and m["decode_tokens_per_sec_b2"] > 0
    assert recs[-1]["measured"]["switch_seconds"] > 0
    assert len(load_records(out, kind="infer")) == 5 and load_records(out, kind="train") == []
    assert "no GPU memory figures" in json.dumps(recs[0]["notes"])


def test_unknown_mode_is_one_line(capsys):
    from qlora_bench.cli import main

    assert main(["infer-bench", "--model", TINY, "--modes", "base16,fast"]) == 2
    assert "unknown mode" in capsys.readouterr().err


def _fake_run_one(cfg, timeout, workdir):
    """A worker's record without a worker: merged16 fails with a message that looks like rich markup."""
    from qlora_bench.run.sweep import _base_record

    rec = _base_record(cfg, "ok", None)
    rec["notes"] = []
    if cfg.mode == "merged16":
        rec.update(outcome="error", error="RuntimeError: size [2, 8] vs [/dev/shm] [b]",
                   traceback='  File "/x/qlora_bench/run/infer.py", line 9, in build_serving_model\n')
    return rec


def test_a_failed_mode_is_shown_and_exits_1(tmp_path, capsys, monkeypatch):
    import qlora_bench.run.sweep as sw
    from qlora_bench.cli import main

    monkeypatch.setattr(sw, "run_one", _fake_run_one)
    out = tmp_path / "infer.jsonl"
    assert main(["infer-bench", "--model", TINY, "--modes", "base16,merged16", "--out", str(out)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert ("merged16: error: RuntimeError: size [2, 8] vs [/dev/shm] [b] (raised at infer.py:9 in "
            "build_serving_model)") in text
    assert "base16: ok" not in text and len(read_jsonl(out)) == 2
    monkeypatch.setattr(sw, "run_one", lambda cfg, t, w: {**_fake_run_one(cfg, t, w), "outcome": "ok", "error": None})
    assert main(["infer-bench", "--model", TINY, "--modes", "base16,merged16", "--out", str(out)]) == 0


def test_infer_bench_of_a_real_size_model_on_cpu_is_refused(tmp_path, capsys, monkeypatch):
    import qlora_bench.run.sweep as sw
    from qlora_bench.cli import main
    from qlora_bench.run import preflight

    monkeypatch.setattr(preflight, "cuda_available", lambda: False)
    monkeypatch.setattr(sw, "run_one", lambda *a: pytest.fail("not refused"))
    assert main(["infer-bench", "--model", "8b", "--out", str(tmp_path / "i.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora-bench: error: infer-bench on CPU: llama-3.1-8b (") and err.count("\n") == 1
    assert "--prompt" in err and "--yes" in err


def test_infer_ids_name_the_model_not_its_file():
    from qlora_bench.run.infer import InferBenchConfig

    assert InferBenchConfig(f"{TINY}/config.json", "base16").name.startswith("tiny-llama/infer/base16/")
    assert InferBenchConfig("8b", "switch").name.startswith("llama-3.1-8b/infer/switch/")
