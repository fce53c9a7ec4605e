"""The command line as a user runs it: human and JSON output, --method all, and every bad-input case."""

import json
import subprocess
import sys
import urllib.error

import pytest

from qlora_bench import profiles
from qlora_bench.cli import main


def run(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse refuses a flag's value
        code = e.code
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


def test_malformed_config_bytes(capsys, tmp_path):
    f = tmp_path / "config.json"
    for data, needle in ((b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"), ('{"a": "é"}'.encode("utf-16"), "UTF-16"),
                         ('{"model_type": "llama", "x": "é"}'.encode("latin-1"), "not UTF-8")):
        f.write_bytes(data)
        code, _, err = run(capsys, "plan", "--model", str(f), "--gpu", "24gb")
        _one_line_error(code, err, str(f), needle)


def test_config_paths_that_are_not_files(capsys, tmp_path):
    import os

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # must be refused, not read (it would block forever)
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop.json")
    (tmp_path / "empty-folder").mkdir()
    for name, needle in (("fifo.json", "not a regular file"), ("dangling.json", "broken link"),
                         ("loop.json", "unreadable"), ("empty-folder", "without config.json")):
        code, _, err = run(capsys, "plan", "--model", str(tmp_path / name), "--gpu", "24gb")
        _one_line_error(code, err, name, needle)


def test_mixtral_without_expert_count_is_an_eight_expert_model(capsys, tmp_path):
    """transformers' MixtralConfig defaults num_local_experts to 8: a config.json without it is not dense."""
    cfg = json.loads((profiles.profiles_dir() / "models" / "mixtral-8x7b.json").read_text())["config"]
    del cfg["num_local_experts"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, _ = run(capsys, "plan", "--model", str(tmp_path), "--gpu", "h200", "--json")
    d = json.loads(out)
    assert code == 0 and d["total_params"] > 46e9
    assert any("num_local_experts (so 8)" in n for n in d["notes"])


def test_long_sequence_is_flagged(capsys):
    code, out, _ = run(capsys, "plan", "--model", "llama-2-7b", "--gpu", "h100", "--seq", "8k", "--json")
    d = json.loads(out)
    assert code == 0 and d["settings"]["seq"] == 8192
    assert any("longer than the model's context" in n and "4,096" in n for n in d["notes"])


def test_typed_forms(capsys):
    code, out, _ = run(capsys, "plan", "--model", "8b", "--gpu", "h100", "--method", "QLoRA", "--epoch-tokens",
                       "100M", "--attn", "SDPA", "--json")
    d = json.loads(out)
    assert code == 0 and d["method"] == "qlora" and d["epoch_tokens"] == 100_000_000 and d["settings"]["attn"] == "sdpa"
    code, out, _ = run(capsys, "plan", "--model", "8b", "--gpu", "h100", "--targets", "q_proj, v_proj,q_proj",
                       "--json")
    assert json.loads(out)["settings"]["targets"] == "q_proj,v_proj"


def test_bigger_gpu_prefers_the_older_card_of_a_size(capsys):
    code, out, _ = run(capsys, "plan", "--model", "70b", "--gpu", "48gb", "--json")
    flags = [s["flags"] for s in json.loads(out)["suggestions"]]
    assert "--gpu a100-80gb" in flags and "--gpu h100-pcie" not in flags


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
    (["--model", "8b", "--gpu", "h100", "--dropout", "1.5"], ["dropout", "[0, 1)"]),
    (["--model", "8b", "--gpu", "h100", "--alpha", "nan"], ["--alpha", "finite"]),
    (["--model", "8b", "--gpu", "h100", "--targets", ","], ["--targets", "q_proj,v_proj"]),
    (["--model", "8b", "--gpu", "24"], ["24gb"]),
    (["--model", "8b", "--gpu", "9" * 5000 + "x24gb"], ["GPU count", "64"]),
    (["--model", "8b", "--gpu", "h100", "--batch", "1" + "0" * 400], ["--batch", "1,048,576"]),
    (["--model", "x" * 300, "--gpu", "h100"], ["unknown model"]),
    (["--model", "/tmp/" + "x" * 300 + ".json", "--gpu", "h100"], ["File name too long"]),
    (["--model", "a\0b.json", "--gpu", "h100"], ["not a usable file path"]),
    (["--model", "", "--gpu", "h100"], ["--model is empty"]),
])
def test_bad_input_is_one_line(capsys, args, needles):
    code, _, err = run(capsys, "plan", *args)
    _one_line_error(code, err, *needles)


@pytest.mark.parametrize("args,needles", [
    (["--batch", "0"], ["--batch", "between 1 and"]),
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
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3}', ["hidden_size", "multiple of"]),
    ('{"model_type": "bert"}', ["model_type", "llama"]),
    ('{"model_type": "llama", "hidden_size": -1, "intermediate_size": 1, "num_hidden_layers": 1, '
     '"num_attention_heads": 1, "vocab_size": 1}', ["'hidden_size' is -1", "an integer in [1,"]),
    ('{"model_type": "llama", "num_key_value_heads": 0}', ["num_key_value_heads", "in [1,"]),
    ('{"model_type": "llama", "num_key_value_heads": true}', ["num_key_value_heads", "is true"]),
    ('{"model_type": "llama", "head_dim": 0}', ["head_dim"]),
    ('{"model_type": "llama", "head_dim": "128"}', ["head_dim", "'128'"]),
    ('{"model_type": "llama", "head_dim": NaN}', ["NaN is not a JSON number"]),
    ('{"model_type": "llama", "max_position_embeddings": null}', ["max_position_embeddings", "null"]),
    ('{"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 5}', ["num_experts_per_tok", "at most"]),
    ('{"model_type": "llama", "vocab_size": 1' + "0" * 5000 + '}', ["too many digits"]),
    ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ("[1, 2]", ["expected a JSON object"]),
    ("", ["not valid JSON"]),
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


def test_piped_into_head_exits_0():
    r = subprocess.run(f"{sys.executable} -m qlora_bench plan --model 70b --gpu 48gb | head -1; "
                       "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert r.returncode == 0 and "llama-3.1-70b" in r.stdout and r.stderr == ""


def test_results_folder_without_results_falls_back_to_the_shipped_ones(capsys, tmp_path, monkeypatch):
    """`baseline update` creates ./results/baselines: that alone is not the user's results."""
    (tmp_path / "results" / "baselines").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "validate")
    assert code == 0 and "records:" in out and "false fits" in out


def test_bigger_gpu_runs_the_plans_dtype(capsys):
    code, out, _ = run(capsys, "plan", "--model", "8b", "--gpu", "12gb", "--seq", "1024", "--json")
    flags = [s["flags"] for s in json.loads(out)["suggestions"]]
    assert code == 0 and "--gpu t4" not in flags and any(f.startswith("--gpu ") for f in flags)


def test_yaml_alias_bomb_is_refused_quickly(capsys, tmp_path):
    """A 500-byte sweep file whose lists reference each other 9 levels deep: the message must not expand it."""
    import time

    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    lines.append("grid: [{model: 8b, seq: *a8}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    code, _, err = run(capsys, "sweep", str(tmp_path / "bomb.yaml"), "--dry-run")
    assert time.perf_counter() - t0 < 5
    _one_line_error(code, err, "bomb.yaml")


def test_record_errors_name_the_record(capsys, tmp_path):
    from qlora_bench.results import RESULTS_DIR

    lines = (RESULTS_DIR / "h100" / "hf-stack-shared.jsonl").read_text().splitlines()
    d = json.loads(lines[2])
    d["settings"]["targets"] = "foo_proj"
    (tmp_path / "r.jsonl").write_text("\n".join([*lines[:2], json.dumps(d)]) + "\n")
    code, _, err = run(capsys, "validate", str(tmp_path / "r.jsonl"))
    _one_line_error(code, err, "r.jsonl:3:", "foo_proj")
