"""The command line as a user runs it: human and JSON output, --method all, and every bad-input case."""

import json
import subprocess
import sys
import urllib.error

import pytest

from qlora_bench import profiles
from qlora_bench.cli import main


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_exit(capsys, *args):
    """argparse errors raise SystemExit(2)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_plan_human(capsys):
    code, out, _ = run(capsys, "plan", "--model", "70b", "--gpu", "48gb")
    assert code == 0
    for text in ("llama-3.1-70b", "DOES NOT FIT", "base weights, 4-bit packed", "logits + cross-entropy",
                 "largest micro-batch", "changes that would fit", "--no-upcast-non-quantized"):
        assert text in out


def test_plan_json_fields(capsys):
    code, out, _ = run(capsys, "plan", "--model", "llama-3.1-8b", "--gpu", "h100", "--json")
    assert code == 0
    d = json.loads(out)
    for key in ("model", "gpu", "method", "settings", "components", "peak_allocated_bytes", "peak_reserved_bytes",
                "peak_device_bytes", "gpu_memory_bytes", "fits", "headroom_bytes", "max_batch", "max_seq",
                "suggestions"):
        assert key in d
    assert d["fits"] is True and d["method"] == "qlora" and d["settings"]["optimizer"] == "paged_adamw_8bit"
    assert sum(d["components"].values()) == d["peak_device_bytes"]
    assert d["max_batch"] >= 1 and d["max_seq"] >= 2048


def test_method_all(capsys):
    code, out, _ = run(capsys, "plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--method", "all",
                       "--seq", "4096", "--json")
    assert code == 0
    d = json.loads(out)
    assert [x["method"] for x in d] == ["full", "lora", "qlora"]
    assert [x["settings"]["optimizer"] for x in d] == ["adamw_torch_fused", "adamw_torch_fused", "paged_adamw_8bit"]
    code, out, _ = run(capsys, "plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--method", "all")
    assert code == 0 and "full" in out and "qlora" in out and "verdict" in out


def test_local_config(capsys, tmp_path):
    cfg = json.loads((profiles.profiles_dir() / "models" / "llama-3.2-1b.json").read_text())["config"]
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text(json.dumps(cfg))
    for arg in (tmp_path / "my-model", tmp_path / "my-model" / "config.json"):
        code, out, _ = run(capsys, "plan", "--model", str(arg), "--gpu", "24gb", "--json")
        assert code == 0 and json.loads(out)["model"] == "my-model"


def test_profiles_command(capsys):
    code, out, _ = run(capsys, "profiles")
    assert code == 0 and "llama-3.1-70b" in out and "h100-sxm" in out


@pytest.mark.parametrize("gpu", ["48gb", "48GiB", "48 GB", "h100", "H100", "rtx-4090", "2x24gb", "2xh100", "a100"])
def test_gpu_spellings(gpu):
    g = profiles.resolve_gpu(gpu)
    assert g.memory_total_bytes > 10 * 1024**3


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["--model", "llama-3.1-9b", "--gpu", "h100"], ["unknown model", "llama-3.1-8b"]),
    (["--model", "lama-70b", "--gpu", "h100"], ["unknown model", "closest"]),
    (["--model", "8b", "--gpu", "h1000"], ["unknown GPU", "h100"]),
    (["--model", "8b", "--gpu", "48tb"], ["GB or GiB"]),
    (["--model", "8b", "--gpu", "0gb"], ["out of range"]),
    (["--model", "8b", "--gpu", "h100", "--rank", "5000"], ["rank 5000", "q_proj", "rank <= 4096"]),
    (["--model", "8b", "--gpu", "h100", "--method", "full", "--quant", "fp4"], ["fp4", "qlora"]),
    (["--model", "8b", "--gpu", "h100", "--targets", "foo_proj"], ["foo_proj", "q_proj"]),
    (["--model", "8b", "--gpu", "h100", "--dropout", "1.5"], ["dropout"]),
])
def test_bad_input_is_one_line(capsys, args, needles):
    code, _, err = run(capsys, "plan", *args)
    _one_line_error(code, err, *needles)


@pytest.mark.parametrize("args,needles", [
    (["--batch", "0"], ["--batch", "at least 1"]),
    (["--seq", "-5"], ["--seq"]),
    (["--seq", "abc"], ["--seq", "whole number"]),
    (["--method", "qlora4"], ["--method", "invalid choice"]),
    (["--optimizer", "adam"], ["--optimizer"]),
])
def test_bad_flags_are_one_line(capsys, args, needles):
    code, _, err = run_exit(capsys, "plan", "--model", "8b", "--gpu", "h100", *args)
    _one_line_error(code, err, *needles)


@pytest.mark.parametrize("content,needles", [
    ("{not json", ["not valid JSON"]),
    ('{"model_type": "llama", "hidden_size": 64}', ["missing field 'num_attention_heads'"]),
    ('{"model_type": "bert"}', ["model_type", "llama"]),
    ('{"model_type": "llama", "hidden_size": -1, "intermediate_size": 1, "num_hidden_layers": 1, '
     '"num_attention_heads": 1, "vocab_size": 1}', ["hidden_size", "positive"]),
])
def test_malformed_config(capsys, tmp_path, content, needles):
    f = tmp_path / "config.json"
    f.write_text(content)
    code, _, err = run(capsys, "plan", "--model", str(f), "--gpu", "24gb")
    _one_line_error(code, err, str(f), *needles)


def test_malformed_profile_names_file_and_field(capsys, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "gpus").mkdir()
    (tmp_path / "models" / "bad.json").write_text('{"name": "bad", "config": {}}')
    monkeypatch.setattr(profiles, "profiles_dir", lambda: tmp_path)
    for f in (profiles._model_profiles, profiles._model_index):
        f.cache_clear()
    try:
        code, _, err = run(capsys, "plan", "--model", "bad", "--gpu", "24gb")
        _one_line_error(code, err, "bad.json", "source")
    finally:
        monkeypatch.undo()
        for f in (profiles._model_profiles, profiles._model_index):
            f.cache_clear()


def test_hub_id_offline(capsys, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(profiles.urllib.request, "urlopen", offline)
    code, _, err = run(capsys, "plan", "--model", "someorg/some-model", "--gpu", "24gb")
    _one_line_error(code, err, "someorg/some-model", "offline")


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "qlora_bench", "plan", "--model", "1b", "--gpu", "t4"],
                         capture_output=True, text=True, check=True).stdout
    assert "llama-3.2-1b" in out and "no bf16" in out


def test_validate_command(capsys, monkeypatch):
    from qlora_bench import render

    monkeypatch.setattr(render.console, "width", 220)
    code, out, _ = run(capsys, "validate")
    assert code == 0 and "held-out" in out and "false fits" in out
    code, out, _ = run(capsys, "validate", "--json")
    d = json.loads(out)
    assert d["summary"]["all"]["n"] == len(d["rows"]) >= 10
    assert all(set(r["errors"]) >= {"peak_allocated_bytes", "peak_device_bytes", "static_after_load_bytes"}
               for r in d["rows"])


def test_validate_without_gpu_records_is_one_line(capsys, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = run(capsys, "validate", str(tmp_path / "empty.jsonl"))
    _one_line_error(code, err, "no GPU records")


def test_infer_command(capsys):
    code, out, _ = run(capsys, "infer", "--model", "8b", "--gpu", "24gb", "--adapters", "4", "--json")
    d = json.loads(out)
    assert code == 0 and [m["mode"] for m in d["modes"]] == ["base16", "adapters4", "merged16", "merged4"]
    assert d["merge"]["path"] == "GPU" and d["adapter"]["params"] == 41_943_040
    code, out, _ = run(capsys, "infer", "--model", "70b", "--gpu", "48gb")
    assert code == 0 and "CPU" in out and "KV cache" in out
    code, _, err = run(capsys, "infer", "--model", "8b", "--gpu", "24gb", "--context", "100", "--prompt", "200")
    _one_line_error(code, err, "--context")
