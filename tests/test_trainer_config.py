"""`plan --config`: trainer config files (Axolotl, TRL, LLaMA-Factory, TrainingArguments JSON) read into Settings.

The files under tests/data/trainer-configs/ are written for these tests in the shape of each project's documented
examples; the TrainingArguments JSON is `TrainingArguments(...).to_json_string()` of the installed transformers.
"""

import json
from pathlib import Path

import pytest

from qlora_bench.cli import main
from qlora_bench.errors import InputError
from qlora_bench.trainer_config import detect, read

DATA = Path(__file__).parent / "data" / "trainer-configs"


def _plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "name, tool, method",
    [
        ("axolotl-qlora.yml", "axolotl", "qlora"),
        ("axolotl-lora.yml", "axolotl", "lora"),
        ("axolotl-full.yml", "axolotl", "full"),
        ("trl-sft-qlora.yaml", "trl", "qlora"),
        ("trl-sft-full.yaml", "trl", "full"),
        ("llama-factory-lora.yaml", "llama-factory", "lora"),
        ("llama-factory-qlora.yaml", "llama-factory", "qlora"),
        ("llama-factory-full.yaml", "llama-factory", "full"),
        ("transformers-training-args.json", "transformers", None),
    ],
)
def test_each_file_is_detected_and_every_key_accounted_for(name, tool, method):
    tc = read(DATA / name)
    assert tc.tool == tool
    assert tc.values.get("method") == method
    data = tc.to_dict()
    assert set(data["read_from"]) == set(data["values"])
    assert not tc.unknown, tc.unknown  # every key of a documented example is known


def test_axolotl_qlora_maps_its_keys():
    tc = read(DATA / "axolotl-qlora.yml")
    v = tc.values
    assert tc.model == "NousResearch/Meta-Llama-3.1-8B"
    assert (v["rank"], v["alpha"], v["dropout"], v["targets"]) == (32, 16, 0.05, "all-linear")
    assert (v["seq"], v["batch"], v["grad_accum"], v["epochs"]) == (4096, 2, 4, 4.0)
    assert (v["optimizer"], v["gradient_checkpointing"], v["attn"], v["compute_dtype"]) == (
        "paged_adamw_32bit",
        True,
        "flash_attention_2",
        "bf16",
    )
    assert tc.read_from["seq"] == "sequence_len: 4096"
    assert any(n.startswith("sample_packing") for n in tc.not_modelled)
    assert "learning_rate" in tc.no_effect and "datasets" in tc.no_effect


def test_axolotl_lora_and_full_name_what_is_not_modelled():
    lora = read(DATA / "axolotl-lora.yml")
    assert lora.values["targets"] == "q_proj,k_proj,v_proj,o_proj"
    assert lora.values["optimizer"] == "adamw_bnb_8bit"  # a TrainingArguments name Settings takes as written
    assert lora.values["attn"] == "sdpa"
    assert any(n.startswith("liger_fused_linear_cross_entropy") for n in lora.not_modelled)
    full = read(DATA / "axolotl-full.yml")
    assert any(n.startswith("deepspeed") for n in full.not_modelled)


def test_trl_qlora_and_full():
    q = read(DATA / "trl-sft-qlora.yaml")
    assert q.model == "Qwen/Qwen2.5-7B"
    v = q.values
    assert (v["method"], v["rank"], v["targets"], v["quant"], v["double_quant"]) == (
        "qlora",
        32,
        "all-linear",
        "nf4",
        True,
    )
    assert (v["seq"], v["batch"], v["grad_accum"], v["attn"]) == (4096, 2, 8, "flash_attention_2")
    f = read(DATA / "trl-sft-full.yaml")
    assert (f.values["method"], f.values["batch"], f.values["grad_accum"], f.values["epochs"]) == ("full", 4, 4, 3.0)


def test_llama_factory():
    lora = read(DATA / "llama-factory-lora.yaml")
    v = lora.values
    assert (v["method"], v["rank"], v["targets"], v["seq"], v["batch"], v["grad_accum"]) == (
        "lora",
        8,
        "all-linear",
        2048,
        1,
        8,
    )
    q = read(DATA / "llama-factory-qlora.yaml")
    assert q.values["method"] == "qlora"
    full = read(DATA / "llama-factory-full.yaml")
    assert full.values["attn"] == "flash_attention_2" and any(n.startswith("deepspeed") for n in full.not_modelled)


def test_training_arguments_json_from_transformers():
    tc = read(DATA / "transformers-training-args.json")
    v = tc.values
    assert tc.model is None
    assert (v["batch"], v["grad_accum"], v["gradient_checkpointing"], v["optimizer"], v["compute_dtype"]) == (
        4,
        4,
        True,
        "paged_adamw_8bit",
        "bf16",
    )
    assert len(tc.no_effect) > 80  # the other TrainingArguments fields, listed


def test_plan_from_a_config_file_equals_the_same_flags(capsys):
    """The file's settings plan exactly as the same settings given as flags."""
    from_file = _plan_json(capsys, "--config", str(DATA / "axolotl-qlora.yml"), "--gpu", "24gb")
    flags = _plan_json(
        capsys,
        "--model",
        "llama-3.1-8b",
        "--gpu",
        "24gb",
        "--method",
        "qlora",
        "--rank",
        "32",
        "--alpha",
        "16",
        "--seq",
        "4096",
        "--batch",
        "2",
        "--grad-accum",
        "4",
        "--optimizer",
        "paged_adamw_32bit",
        "--attn",
        "flash_attention_2",
        "--epochs",
        "4",
        *_upcast_flag(from_file),
    )
    assert from_file["settings"] == flags["settings"]
    assert from_file["peak_device_bytes"] == flags["peak_device_bytes"]
    assert from_file["trainer_config"]["tool"] == "axolotl"


def _upcast_flag(plan: dict) -> list[str]:
    return [] if plan["settings"]["upcast_non_quantized"] else ["--no-upcast-non-quantized"]


def test_flags_on_the_command_line_win_over_the_file(capsys):
    p = _plan_json(capsys, "--config", str(DATA / "axolotl-qlora.yml"), "--gpu", "24gb", "--batch", "1", "--seq", "2k")
    assert (p["settings"]["batch"], p["settings"]["seq"], p["settings"]["rank"]) == (1, 2048, 32)


def test_hub_id_in_the_file_resolves_to_a_profile_offline(capsys, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise AssertionError("no network for a model a profile has")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    p = _plan_json(capsys, "--config", str(DATA / "llama-factory-lora.yaml"), "--gpu", "24gb")
    assert p["model"] == "llama-3.1-8b"  # Meta-Llama-3-8B-Instruct: the architecture of Llama-3(.1)-8B
    p = _plan_json(capsys, "--config", str(DATA / "trl-sft-qlora.yaml"), "--gpu", "24gb")
    assert p["model"] == "qwen2.5-7b"


def test_training_arguments_json_needs_a_model(capsys):
    assert main(["plan", "--config", str(DATA / "transformers-training-args.json"), "--gpu", "24gb"]) == 2
    assert "names no base model" in capsys.readouterr().err
    p = _plan_json(
        capsys,
        "--config",
        str(DATA / "transformers-training-args.json"),
        "--gpu",
        "80gb",
        "--model",
        "8b",
        "--method",
        "lora",
    )
    assert (p["settings"]["method"], p["settings"]["batch"], p["settings"]["optimizer"]) == (
        "lora",
        4,
        "paged_adamw_8bit",
    )


def test_human_output_lists_what_was_read_and_what_was_not(capsys):
    assert main(["plan", "--config", str(DATA / "axolotl-lora.yml"), "--gpu", "24gb"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Axolotl config" in out and "profile mistral-7b" in out
    assert "rank 16 lora_r: 16" in out
    assert "not modelled: liger_fused_linear_cross_entropy" in out
    assert "not used (no effect on memory or speed):" in out and "learning_rate" in out


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- a\n- b\n", "expected a mapping of trainer settings"),
        ("lora_r: [1\n", "not valid YAML"),
        ("foo: 1\nbar: 2\n", "not a trainer config qlora-bench knows"),
        ("base_model: x\nadapter: ia3\n", "key 'adapter' is 'ia3'"),
        ("base_model: x\nadapter: lora\nlora_r: sixteen\n", "key 'lora_r' is 'sixteen'; expected a whole number"),
        ("base_model: x\nadapter: lora\nlora_r: 0\n", "key 'lora_r': field 'rank' is 0"),
        ("base_model: x\nadapter: lora\nlora_dropout: .inf\n", "key 'lora_dropout'"),
        ("model_name_or_path: x\nmax_length: null\n", "key 'max_length' is null (no truncation"),
        ("base_model: x\nmicro_batch_size: -1\n", "batch"),
        (
            "model_name_or_path: x\nbnb_4bit_quant_type: int4\nload_in_4bit: true\nuse_peft: true\n",
            "expected nf4 or fp4",
        ),
        ("stage: sft\nfinetuning_type: freeze\n", "freeze and oft are not modelled"),
        ("stage: sft\nfinetuning_type: lora\nflash_attn: fa3\n", "expected auto, disabled, sdpa or fa2"),
        ("1: 2\n", "is not a name"),
    ],
)
def test_bad_files_are_refused_in_one_line(tmp_path, capsys, text, needle):
    f = tmp_path / "train.yaml"
    f.write_text(text)
    assert main(["plan", "--config", str(f), "--gpu", "24gb", "--model", "8b"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_missing_file_and_no_model_at_all(tmp_path, capsys):
    assert main(["plan", "--config", str(tmp_path / "nope.yaml"), "--gpu", "24gb"]) == 2
    assert "no such trainer config file" in capsys.readouterr().err
    assert main(["plan", "--gpu", "24gb"]) == 2
    assert "plan needs --model" in capsys.readouterr().err


def test_detect_prefers_each_tools_own_vocabulary():
    assert detect({"model_name_or_path": "x", "finetuning_type": "lora"}, "f") == "llama-factory"
    assert detect({"base_model": "x", "per_device_train_batch_size": 2}, "f") == "axolotl"
    assert detect({"model_name_or_path": "x", "per_device_train_batch_size": 2}, "f") == "trl"
    assert detect({"per_device_train_batch_size": 2, "output_dir": "o"}, "f") == "transformers"
    with pytest.raises(InputError, match="not a trainer config"):
        detect({"hello": 1}, "f")


def _all_keys() -> list[str]:
    from qlora_bench import trainer_config as t

    keys = set().union(*t.SIGNATURES.values(), t.AXOLOTL_NO_EFFECT, t.TRL_NO_EFFECT, t.LLAMA_FACTORY_NO_EFFECT)
    keys |= {"lora_r", "lora_alpha", "lora_dropout", "lora_rank", "gradient_checkpointing", "optimizer", "optim",
             "bf16", "fp16", "adapter", "load_in_4bit", "quantization_bit", "deepspeed", "bnb_config_kwargs",
             "attn_implementation", "flash_attn", "lora_target_modules", "batch_size", "dtype", "loss_type"}
    return sorted(keys)


VALUES = [None, True, False, 0, 1, -3, 2**40, 0.5, float("nan"), "", "auto", "lora", "qlora", "all", "fa2", "nf4",
          "paged_adamw_8bit", "x" * 300, [], ["q_proj"], [1, 2], {}, {"bnb_4bit_quant_type": "fp4"}]


def test_any_mapping_of_known_keys_reads_or_is_refused_in_one_line():
    """Generated files from the trainers' own key names and odd values: read, or an InputError; never a crash."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from qlora_bench.settings import Settings
    from qlora_bench.trainer_config import READERS

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(_all_keys()), st.sampled_from(VALUES), max_size=12))
    def check(data):
        try:
            tool = detect(data, "f.yaml")
            tc = READERS[tool](data, "f.yaml")
            tc.settings(Settings())
        except InputError as e:
            assert "\n" not in str(e)

    check()


def test_odd_files_are_named_not_read(tmp_path, capsys):
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, needle in (("folder.yaml", "found a folder"), ("empty.yaml", "found null"),
                         ("binary.yaml", "UTF-16"), ("list.json", "found a list")):
        assert main(["plan", "--config", str(tmp_path / name), "--gpu", "24gb"]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (name, err)


def test_nested_bitsandbytes_keys_are_accounted_for(tmp_path):
    f = tmp_path / "a.yml"
    f.write_text("base_model: x\nadapter: qlora\nbnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n"
                 "  bnb_4bit_quant_storage: bfloat16\n  made_up: 1\n")
    tc = read(f)
    assert tc.values["quant"] == "fp4"
    assert "bnb_config_kwargs.bnb_4bit_quant_storage" in tc.no_effect
    assert tc.unknown == ["bnb_config_kwargs.made_up"]


def test_a_null_max_length_plans_with_the_seq_flag(capsys, tmp_path):
    f = tmp_path / "sft.yaml"
    f.write_text("model_name_or_path: meta-llama/Llama-3.1-8B\nmax_length: null\nuse_peft: true\n")
    p = _plan_json(capsys, "--config", str(f), "--gpu", "80gb", "--seq", "4k")
    assert p["settings"]["seq"] == 4096


def test_axolotl_trains_bf16_when_the_file_says_nothing(tmp_path):
    f = tmp_path / "a.yml"
    f.write_text("base_model: x\nadapter: lora\nmicro_batch_size: 1\ngradient_accumulation_steps: 1\n")
    tc = read(f)
    assert tc.values["compute_dtype"] == "bf16" and tc.read_from["compute_dtype"].startswith("default: bf16 = auto")
    assert (tc.values["seq"], tc.values["gradient_checkpointing"]) == (512, False)
