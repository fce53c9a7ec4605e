"""Every profile loads and validates; names and aliases are unambiguous."""

from collections import Counter

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
            keys += [name.lower(), *(a.lower() for a in d.get("aliases", []))]
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
