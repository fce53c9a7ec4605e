"""The per-layer activation formulas against what autograd really saves, on CPU, for tiny random models.

A saved_tensors_hooks pack hook records every tensor saved for backward inside one decoder layer; parameters
(no extra memory) and tensors shared with the previous layer (rotary cos/sin) are left out, and the difference
between two sequence lengths is compared so that per-layer constants (autocast copies of the small LoRA
weights) drop out. LoRA dropout is 0 here: on CPU dropout keeps a noise tensor of the input dtype where CUDA's
fused kernel keeps a 1-byte mask (the estimator models the GPU).
"""

import pytest

from qlora_bench.estimate import activations as act
from qlora_bench.profiles import model_from_config
from qlora_bench.settings import Settings

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = {
    "llama": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000),
    "qwen2": dict(model_type="qwen2", hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=1000, pad_token_id=0),
    "mistral": dict(model_type="mistral", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, sliding_window=4096),
    "gemma2": dict(model_type="gemma2", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000,
                   query_pre_attn_scalar=64, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh", pad_token_id=0,
                   bos_token_id=2, eos_token_id=1),
}


def _to_4bit(model):
    """Every nn.Linear in the decoder layers -> bitsandbytes Linear4bit (NF4, double quant), as transformers'
    bitsandbytes path converts them."""
    bnb = pytest.importorskip("bitsandbytes")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)._quantize("cpu")
                    if lin.bias is not None:
                        q.bias = lin.bias
                    assert q.weight.dtype == torch.uint8
                    setattr(parent, name, q)
    model.is_loaded_in_4bit = True
    return model


def _saved_in_layer(cfg, method, attn, batch, seq):
    torch.manual_seed(0)
    c = transformers.AutoConfig.for_model(**cfg, attn_implementation=attn)
    m = transformers.AutoModelForCausalLM.from_config(c).to(torch.bfloat16)
    if method == "qlora":
        m = peft.prepare_model_for_kbit_training(_to_4bit(m), use_gradient_checkpointing=False)
    if method != "full":
        m = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    m.train()
    layers = (m.base_model.model if method != "full" else m).model.layers
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved = {0: {}, 1: {}}
    current = [None]

    def pack(t):
        if current[0] is not None and t.untyped_storage().data_ptr() not in params:
            saved[current[0]][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = []
    for i in (0, 1):
        hooks.append(layers[i].register_forward_pre_hook(lambda *a, i=i: current.__setitem__(0, i)))
        hooks.append(layers[i].register_forward_hook(lambda *a: current.__setitem__(0, None)))
    x = torch.randint(0, 1000, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        m(input_ids=x, labels=x)
    for h in hooks:
        h.remove()
    return sum(v for k, v in saved[1].items() if k not in saved[0])


# transformers 5.23 refuses sdpa for Gemma-2 (it would drop the attention logit softcapping): eager only
CASES = [(arch, attn) for arch in TINY for attn in ("sdpa", "eager") if not (arch == "gemma2" and attn == "sdpa")]


@pytest.mark.parametrize("arch,attn", CASES)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_layer_activation_bytes_per_token(arch, method, attn):
    cfg = TINY[arch]
    spec = model_from_config(cfg, arch, "tiny")
    s = Settings(method=method, attn=attn, rank=8, alpha=16, dropout=0.0, gradient_checkpointing=False,
                 optimizer="adamw_torch", batch=2, seq=32)
    lo, hi = _saved_in_layer(cfg, method, attn, 2, 32), _saved_in_layer(cfg, method, attn, 2, 64)

    def predicted(seq):  # bytes per layer at this length (eager's s^2 term is in the per-token figure)
        return sum(act.layer_saved_per_token(spec, s.with_(seq=seq)).values()) * 2 * seq

    terms = act.layer_saved_per_token(spec, s)
    assert predicted(64) - predicted(32) == pytest.approx(hi - lo, rel=0.005), terms
