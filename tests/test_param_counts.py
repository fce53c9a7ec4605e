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
