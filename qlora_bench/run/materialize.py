"""Real architectures with random weights, built from their config.json, on the device, without a checkpoint.

The model is created on the meta device (no memory), then materialized module by module on the target device:
each parameter is allocated and drawn from N(0, initializer_range) (norms: their neutral value), and for QLoRA
every nn.Linear inside the decoder layers is quantized to bitsandbytes Linear4bit right after it is drawn, so a
70B QLoRA model never exists in 16-bit (neither in host RAM nor on the GPU) and needs no download. The result
has the same modules, dtypes and bytes as `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`
(tests/test_runner.py checks this on a tiny model). Memory and speed do not depend on weight values.
"""

from __future__ import annotations

from ..estimate.adapters import target_modules
from ..profiles import ModelSpec
from ..settings import Settings

TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPE[name])


def _hf_config(spec: ModelSpec, s: Settings):
    import transformers

    cfg = transformers.AutoConfig.for_model(**spec.config)
    cfg.use_cache = False
    return cfg


def _init_param(name: str, module, p, std: float):
    """Random values in place: N(0, std) for matrices and embeddings, the neutral value for norms, 0 for biases."""
    import torch

    with torch.no_grad():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name == "bias":
            p.zero_()
        elif "norm" in type(module).__name__.lower():
            # Gemma-style norms scale by (1 + weight): neutral is 0; the others scale by weight: neutral is 1
            p.fill_(0.0 if "gemma" in type(module).__name__.lower() else 1.0)
        else:
            p.normal_(0.0, std)


def _quantize_linear(lin, s: Settings, device, std: float):
    """A 16-bit nn.Linear -> bitsandbytes Linear4bit, drawing the weight on the device and quantizing it there
    (what transformers' bitsandbytes loader does with a checkpoint's tensors)."""
    import bitsandbytes as bnb
    import torch

    dtype = torch_dtype(s.compute_dtype)
    q = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=dtype,
        compress_statistics=s.double_quant,
        quant_type=s.quant,
        quant_storage=torch.uint8,
        device="meta",
    )
    w = torch.empty(
        lin.out_features,
        lin.in_features,
        dtype=torch_dtype("bf16" if s.compute_dtype == "fp32" else s.compute_dtype),
        device=device,
    )
    w.normal_(0.0, std)
    q.weight = bnb.nn.Params4bit(
        w,
        requires_grad=False,
        quant_type=s.quant,
        compress_statistics=s.double_quant,
        blocksize=s.blocksize,
        quant_storage=torch.uint8,
        module=q,
    ).to(device)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=device), requires_grad=False)
    return q


def build_model(spec: ModelSpec, s: Settings, device, progress=None):
    """The base model on `device`, 16-bit (full / LoRA) or with 4-bit decoder linears (QLoRA), before peft.
    `progress(text)`, if given, hears which decoder layer is being drawn (a 70B build takes minutes)."""
    import torch
    import transformers

    cfg = _hf_config(spec, s)
    load_dtype = torch_dtype(s.compute_dtype)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=load_dtype, attn_implementation=s.attn)
    std = getattr(cfg, "initializer_range", 0.02)
    layers = model.model.layers
    decoder_linears = {id(m) for m in layers.modules() if isinstance(m, torch.nn.Linear)}
    tied = spec.tie_word_embeddings
    out_emb = model.get_output_embeddings()

    replaced = set()  # 16-bit linears swapped for Linear4bit: detached, never to be materialized
    layer_index = {id(layer): i for i, layer in enumerate(layers)}
    what = f"quantizing to 4-bit ({s.quant})" if s.method == "qlora" else f"drawing random {s.compute_dtype} weights"
    for _, parent in list(model.named_modules()):
        if id(parent) in replaced:
            continue
        if progress and id(parent) in layer_index:
            progress(f"building {spec.name}: layer {layer_index[id(parent)] + 1}/{len(layers)}, {what}")
        for child_name, child in list(parent.named_children()):
            if s.method == "qlora" and id(child) in decoder_linears:
                setattr(parent, child_name, _quantize_linear(child, s, device, std))
                replaced.add(id(child))
        if tied and parent is out_emb:
            continue  # shares the embedding's Parameter: tie_weights() below
        for name, p in list(parent.named_parameters(recurse=False)):
            if p.is_meta:
                new = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=True)
                _init_param(name, parent, new, std)
                setattr(parent, name, new)
        for bname, buf in list(parent.named_buffers(recurse=False)):
            # transformers 5.x Gemma-2/3 TextScaledWordEmbedding: a non-persistent 0-d `embed_scale` buffer made
            # from the float kept beside it as `scalar_embed_scale`
            scalar = getattr(parent, f"scalar_{bname}", None)
            if buf is not None and buf.is_meta and scalar is not None:
                parent.register_buffer(bname, torch.tensor(scalar, dtype=buf.dtype, device=device), persistent=False)
        if type(parent).__name__.endswith("RotaryEmbedding"):
            # non-persistent buffers (inv_freq) are computed at construction: build this one on the device
            fresh = type(parent)(config=model.config)
            for bname, buf in fresh.named_buffers(recurse=False):
                parent.register_buffer(bname, buf.to(device), persistent=False)
    if tied:
        model.tie_weights()
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors left on the meta device: {leftovers[:5]}")
    if s.method == "qlora":
        model.is_loaded_in_4bit = True  # what transformers sets; peft's prepare_model_for_kbit_training reads it
    return model


def peft_targets(spec: ModelSpec, s: Settings):
    """peft's target_modules for our `targets` setting (all-linear is peft's own shorthand)."""
    if s.targets == "all-linear":  # Settings keeps presets canonical (lower case)
        return "all-linear"
    return sorted({m.name.split(".")[-1] for m in target_modules(spec, s)})


def prepare_base(model, s: Settings):
    """The user path after loading: peft's kbit preparation (freeze + fp32 upcast) for QLoRA, or freezing for
    LoRA, and non-reentrant gradient checkpointing."""
    import peft

    gc_kwargs = {"use_reentrant": False}
    if s.method == "qlora" and s.upcast_non_quantized:
        return peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=s.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    if s.uses_adapters:
        for p in model.parameters():
            p.requires_grad = False
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    return model


def add_adapters(model, spec: ModelSpec, s: Settings):
    """peft LoRA adapters (fp32: peft's autocast_adapter_dtype default) on the chosen targets."""
    if s.uses_adapters:
        import peft

        cfg = peft.LoraConfig(
            r=s.rank,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            bias="none",
            target_modules=peft_targets(spec, s),
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, cfg)
    model.train()
    return model


def prepare(model, spec: ModelSpec, s: Settings):
    return add_adapters(prepare_base(model, s), spec, s)


def build_optimizer(model, s: Settings, lr: float = 1e-4):
    """The optimizer the HF Trainer builds for this `optim` name (Trainer.get_optimizer_cls_and_kwargs)."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.gettempdir(), optim=s.optimizer, learning_rate=lr, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)
