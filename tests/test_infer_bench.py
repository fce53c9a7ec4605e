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
