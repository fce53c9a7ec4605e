"""Every profile loads and validates; names and aliases are unambiguous."""

import re
from collections import Counter

import pytest

from qlora_bench import profiles


def test_every_model_profile_loads():
    for name in profiles.model_names():
        spec = profiles.load_model_profile(name)
        assert spec.total_params > 0 and spec.source.startswith("config.json of ")


def test_required_profiles_present():
    required = ["llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b",
                "llama-3.1-8b", "llama-3.1-70b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b", "mixtral-8x7b",
                "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "gemma-2-9b",
                "gemma-2-27b", "phi-3-mini"]
    assert set(required) <= set(profiles.model_names())
    gpus = ["rtx-3090", "rtx-4090", "rtx-4080", "t4", "l4", "a10", "rtx-a6000", "l40s", "a100-40gb", "a100-80gb",
            "h100-sxm", "h100-pcie", "h200"]
    assert set(gpus) <= set(profiles.gpu_names())


def test_aliases_unique():
    for getter in (profiles._model_profiles, profiles._gpu_profiles):
        keys = []
        for name, d in getter().items():
            keys += [name.lower(), *(a.lower() for a in d.aliases)]
        dup = [k for k, n in Counter(keys).items() if n > 1]
        assert not dup


def test_short_aliases():
    assert profiles.resolve_model("70b").name == "llama-3.1-70b"
    assert profiles.resolve_model("65b").name == "llama-65b"
    assert profiles.resolve_model("7b").name == "llama-7b"
    assert profiles.resolve_model("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"  # hub id of a profile


def test_h100_memory_matches_measurement():
    """The profile's total equals what NVML reported on the measured H100 (read from the committed record)."""
    from qlora_bench.results import load_records

    rec = next(r for r in load_records() if "H100" in (r.data["environment"]["gpu_name"] or ""))
    assert profiles.resolve_gpu("h100").memory_total_bytes == rec.data["environment"]["nvml_total_bytes"]


def test_generic_sizes():
    g = profiles.resolve_gpu("2x24gb")
    assert g.count == 2 and g.memory_total_bytes == 24 * 1024**3 and g.generic


def test_config_defaults_are_the_installed_transformers_defaults():
    """CONFIG_DEFAULTS (used for fields a config.json leaves out) equals the dataclass defaults of transformers'
    own config classes in the pinned version."""
    import dataclasses

    from transformers import CONFIG_MAPPING

    for model_type, defaults in profiles.CONFIG_DEFAULTS.items():
        fields = {f.name: f for f in dataclasses.fields(CONFIG_MAPPING[model_type])}
        for key, value in defaults.items():
            if key not in fields:  # head_dim is read with getattr(config, "head_dim", hidden // heads)
                assert key == "head_dim" and value is None, (model_type, key)
                continue
            assert fields[key].default == value, (model_type, key, fields[key].default, value)


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "vocab_size", "max_position_embeddings", "tie_word_embeddings"])
@pytest.mark.parametrize("value", [True, "8", 8.0, [8], {"a": 1}])
def test_config_types_are_refused_as_transformers_refuses_them(field, value):
    """A value of the wrong JSON type is refused by transformers' strict LlamaConfig and by the planner alike
    (the planner names the field)."""
    from transformers import LlamaConfig

    if field == "tie_word_embeddings" and value is True:
        value = 1  # true is right there; an integer is not
    with pytest.raises(Exception):  # noqa: B017 (huggingface_hub's strict-dataclass error types vary)
        LlamaConfig(**{field: value})
    with pytest.raises(profiles.InputError, match=f"'{field}'"):
        profiles.model_from_config({"model_type": "llama", field: value}, "m", "config.json")


def test_config_fields_the_planner_accepts_build_in_transformers():
    """What the planner accepts for the fields it reads, transformers accepts too (on a few shapes)."""
    from transformers import LlamaConfig, MixtralConfig

    for cfg in ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 16}, {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 4}):
        spec = profiles.model_from_config(cfg, "m", "config.json")
        c = (MixtralConfig if cfg["model_type"] == "mixtral" else LlamaConfig)(
            **{k: v for k, v in cfg.items() if k != "model_type"})
        assert spec.num_kv_heads == c.num_key_value_heads
        assert spec.head_dim == (c.head_dim or c.hidden_size // c.num_attention_heads)  # as the attention does


def test_multimodal_config_plans_its_language_model():
    from qlora_bench.profiles import model_from_config

    cfg = {"model_type": "gemma3", "vision_config": {"hidden_size": 1152},
           "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                           "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                           "head_dim": 256, "vocab_size": 262208}}
    spec = model_from_config(cfg, "gemma-3-4b", "test")
    assert (spec.num_layers, spec.hidden_size, spec.head_dim) == (34, 2560, 256)
    assert "language model only (text_config)" in spec.planned_as and "separate lm_head" in spec.planned_as
    assert spec.config is cfg


@pytest.mark.parametrize("cfg, needle", [
    ({"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
      "num_attention_heads": 32, "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8},
     "mixture of experts (num_experts 128)"),
    ({"model_type": "mamba", "hidden_size": 768}, "lacks intermediate_size, num_hidden_layers"),
    ({"model_type": 7}, "field 'model_type' is 7"),
    ({"model_type": "", "hidden_size": 4096}, "field 'model_type' is ''"),  # the fuzz tests found this one
    ({"model_type": "  ", "hidden_size": 4096}, "field 'model_type' is '  '"),
])
def test_configs_that_cannot_be_planned_generically_are_refused_in_one_line(cfg, needle):
    from qlora_bench.errors import InputError
    from qlora_bench.profiles import model_from_config

    with pytest.raises(InputError, match=re.escape(needle)):
        model_from_config(cfg, "x", "test")
