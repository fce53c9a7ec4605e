"""Parameter counts of every profile against transformers' own models built on the meta device, and LoRA
adapter counts against peft."""

import pytest

from qlora_bench.estimate.adapters import adapter_params
from qlora_bench.profiles import load_model_profile, model_names
from qlora_bench.settings import Settings

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _meta_model(spec):
    cfg = transformers.AutoConfig.for_model(**spec.config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", model_names())
def test_total_params_equal_transformers(name):
    spec = load_model_profile(name)
    model = _meta_model(spec)
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    assert spec.embedding_params == model.get_input_embeddings().weight.numel()


@pytest.mark.parametrize("name", model_names())
def test_linear_modules_are_what_bitsandbytes_converts(name):
    """Every nn.Linear in a decoder layer is one of our quantizable modules, with the same shape."""
    spec = load_model_profile(name)
    model = _meta_model(spec)
    layer = model.model.layers[0]
    linears = {n.split(".")[-1]: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    ours = {m.name: m for m in spec.layer_modules() if m.is_linear}
    assert set(linears) == set(ours)
    for k, m in linears.items():
        assert (m.in_features, m.out_features, m.bias is not None) == (
            ours[k].in_features,
            ours[k].out_features,
            ours[k].bias,
        )


@pytest.mark.parametrize(
    "name,targets", [("llama-3.1-8b", "all-linear"), ("phi-3-mini", "all-linear"), ("qwen2.5-0.5b", "attn"),
                     ("mixtral-8x7b", "all-linear"), ("llama-3.2-1b", "q_proj,v_proj")]
)
def test_lora_params_equal_peft(name, targets):
    peft = pytest.importorskip("peft")
    spec = load_model_profile(name)
    model = _meta_model(spec)
    target = "all-linear" if targets == "all-linear" else (
        ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"] if targets == "attn" else targets.split(","))
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=target, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert adapter_params(spec, Settings(targets=targets)) == trainable
    # and the published 8B figure: r * (9h + 2*n_kv*d + 3i) per layer
    if name == "llama-3.1-8b":
        assert trainable == 16 * (9 * 4096 + 2 * 1024 + 3 * 14336) * 32 == 41_943_040


# Qwen3-8B's published config.json fields (Qwen/Qwen3-8B): a family qlora-bench does not model exactly
QWEN3_8B = {
    "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "tie_word_embeddings": False, "max_position_embeddings": 40960,
}


def test_a_decoder_outside_the_families_is_planned_as_llama_like_and_says_what_it_misses():
    """Qwen3 planned generically: every weight transformers builds is counted except what the note names (q/k
    norms: 2 x head_dim per layer)."""
    from qlora_bench.profiles import model_from_config

    spec = model_from_config(QWEN3_8B, "qwen3-8b", "test")
    assert spec.model_type == "llama" and "not a family" in spec.planned_as and "q/k norms" in spec.planned_as
    model = _meta_model(spec)  # built from the real config: a Qwen3ForCausalLM
    assert type(model).__name__ == "Qwen3ForCausalLM"
    qk_norms = QWEN3_8B["num_hidden_layers"] * 2 * QWEN3_8B["head_dim"]
    assert spec.total_params == sum(p.numel() for p in model.parameters()) - qk_norms
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert adapter_params(spec, Settings(method="lora")) == trainable
