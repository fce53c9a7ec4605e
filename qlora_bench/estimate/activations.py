"""Activation memory: tensors autograd keeps for backward, the loss head, and per-step transients.

The byte counts follow what the transformers (5.x) Llama-family forward actually saves under
`torch.autocast(bf16)`, tensor by tensor, in the spirit of Korthikanti et al. 2022 (arXiv 2205.05198, section 4),
whose GPT formula (34 s b h + 5 a s^2 b per layer, fp16, no flash) does not fit SwiGLU, GQA, RMSNorm in fp32,
frozen bases or LoRA. Symbols per token: h hidden, i intermediate, q = heads*head_dim, kv = kv_heads*head_dim,
a heads; c = bytes of the compute dtype, r = bytes of the residual stream, m = bytes of a base linear's output.

Which tensors autograd saves (torch derivatives.yaml): mm/linear saves its input only when the weight needs a
gradient and the weight only when the input does, so a frozen base keeps no linear inputs; mul saves each
operand only for the other's gradient; silu/gelu save their input; RMSNorm (`x.to(float32)`, pow, mean,
rsqrt, mul, `weight * x.to(dtype)`) saves the fp32 input and, when the norm weight trains, the 16-bit
normalized tensor. sdpa/flash attention save q, k, v (GQA-sized: transformers passes `enable_gqa` when there
is no padding mask), the output and the fp32 log-sum-exp; eager attention repeats k/v to all heads and saves the
fp32 softmax and its 16-bit copy (a*s per token: the s^2 term).

Dtypes on each path: QLoRA with `prepare_model_for_kbit_training` has fp32 embeddings and norms, so the
residual stream is fp32 (r = 4) and `Linear4bit` returns `.to(input dtype)` (m = r); full and LoRA run a
16-bit model (r = m = c). peft casts the adapter input to the adapter's fp32 dtype, applies dropout (a 1-byte
mask per element) and autocast saves a c-byte copy for lora_A.
"""

from __future__ import annotations

from ..profiles import ModelSpec
from ..settings import Settings
from .adapters import target_modules
from .dtypes import nbytes

LSE_BYTES = 4  # flash / memory-efficient attention keep one fp32 log-sum-exp per head and token
# CUDA dropout is the fused native_dropout kernel, which saves a bool mask (1 B per element); the CPU fallback
# (_dropout_impl) multiplies by a noise tensor of the input's dtype instead. The estimator models the GPU.
DROPOUT_MASK_BYTES = 1
RSQRT_BYTES = 4  # RMSNorm's rsqrt(variance + eps): one fp32 per token


def compute_bytes(s: Settings) -> int:
    return nbytes(s.compute_dtype)


def residual_bytes(s: Settings) -> int:
    """Bytes per element of the hidden states between layers (what a checkpoint keeps per layer)."""
    if s.compute_dtype == "fp32" or (s.method == "qlora" and s.upcast_non_quantized):
        return 4
    return nbytes(s.compute_dtype)


def base_output_bytes(s: Settings) -> int:
    """Linear4bit.forward returns `.to(inp_dtype)`: QLoRA base outputs follow the residual dtype."""
    return residual_bytes(s) if s.method == "qlora" else compute_bytes(s)


def layer_saved_per_token(model: ModelSpec, s: Settings) -> dict[str, int]:
    """Bytes saved for backward per token in one decoder layer, by part (no gradient checkpointing)."""
    h, i, a = model.hidden_size, model.intermediate_size, model.num_heads
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    c, m = compute_bytes(s), base_output_bytes(s)
    k = model.experts_per_token
    full = s.method == "full"
    terms: dict[str, int] = {}
    # RMSNorm: fp32 copy of the input (the input itself when it is fp32), the fp32 rsqrt per token, and the
    # normalized 16-bit x when the norm weight trains
    # (Gemma-2's norm multiplies the fp32 normalized x by fp32 (1 + weight): that saved tensor is fp32)
    normed = (4 if model.model_type == "gemma2" else c) * h
    terms["norms"] = model.norms_per_layer * (4 * h + RSQRT_BYTES + (normed if full else 0))
    if full:  # inputs of the trainable linears: q/k/v share one, o, gate/up share one (routed k times), down.
        # sdpa/flash allocate their output like the query (empty_like), and the query after rotary embedding is in
        # [b, s, heads, d] memory order, so o_proj's input (`transpose(1, 2).contiguous()`) is the attention output
        # itself, counted below. Eager attention's output is [b, heads, s, d] (a real copy), and so is Phi-3's
        # query, whose rotary embedding concatenates rotated and pass-through halves (torch.cat).
        o_input = c * q if (s.attn == "eager" or model.model_type == "phi3") else 0
        terms["linear inputs"] = c * (h + k * h + k * i) + o_input
    if s.attn == "eager":  # q, and k and v repeated to all heads; the fp32 softmax and its 16-bit copy
        terms["attention"] = c * (3 * q) + (4 + c) * a * s.seq
        if model.attn_logit_softcapping:  # Gemma-2: tanh(scores / cap) keeps its 16-bit output
            terms["attention"] += c * a * s.seq
    else:
        terms["attention"] = c * (q + 2 * kv) + c * q + LSE_BYTES * a
    # gate output (kept by the activation), activation output and up output (kept by their product);
    # a MoE layer runs k experts per token and keeps its routed copy of the hidden state
    terms["mlp"] = k * 3 * i * m + ((k * h * c + 4 * model.num_experts) if model.is_moe else 0)
    if s.uses_adapters:
        mask = DROPOUT_MASK_BYTES if s.dropout > 0 else 0
        per_layer = 0
        for mod in target_modules(model, s):
            uses = model.experts_per_token if mod.group == "expert" else mod.count  # a token visits k experts
            per_layer += uses * ((mask + c) * mod.in_features + c * s.rank)
        terms["lora inputs"] = per_layer
    return terms


def layer_saved_fixed(model: ModelSpec, s: Settings) -> int:
    """Per-layer saved bytes that do not scale with tokens.

    Expert stacks with LoRA: peft's ParamWrapper makes W' = W + scaling * lhs @ rhs (the stack's size, in its
    dtype) every forward, and grouped_mm saves it (program.py `moe_experts`). grouped_mm is not autocast-enabled,
    so fp32 (upcast) experts are used as they are, with no 16-bit copy.
    """
    return merged_expert_bytes(model, s)


def merged_expert_bytes(model: ModelSpec, s: Settings, largest: bool = False) -> int:
    """Per layer: the merged copies of the LoRA-targeted expert stacks (all of them, or the largest one: its
    gradient is what backward holds at full size)."""
    if not (model.is_moe and s.uses_adapters):
        return 0
    eb = 4 if (s.compute_dtype == "fp32" or (s.method == "qlora" and s.upcast_non_quantized)) else compute_bytes(s)
    stacks = [m.weight_params * eb for m in target_modules(model, s) if m.group == "expert"]
    return max(stacks, default=0) if largest else sum(stacks)


def layer_grad_in_flight_per_token(model: ModelSpec, s: Settings) -> int:
    """Gradient buffers alive while one layer runs backward: the residual gradient and its sum (r*h each),
    and two intermediate-sized gradients (m*i each), plus the attention-probability gradient for eager."""
    r, m = residual_bytes(s), base_output_bytes(s)
    i = model.intermediate_size * model.experts_per_token
    extra = (4 + compute_bytes(s)) * model.num_heads * s.seq if s.attn == "eager" else 0
    return 2 * r * model.hidden_size + 2 * m * i + extra


def checkpoint_bytes(model: ModelSpec, s: Settings) -> int:
    """Gradient checkpointing (non-reentrant) keeps each decoder layer's input hidden states."""
    return model.num_layers * s.tokens_per_step * model.hidden_size * residual_bytes(s)


def loss_head_bytes(model: ModelSpec, s: Settings) -> int:
    """Logits and cross-entropy at their peak (the cross-entropy backward).

    transformers' ForCausalLMLoss upcasts logits with `.float()`; cross_entropy = log_softmax + nll_loss keeps
    the fp32 log_softmax output (4 B per token x vocab). In backward nll_loss produces a fp32 gradient (4 B) and
    log_softmax_backward a fresh fp32 gradient (4 B) while the saved output is still alive: 12 B per token x
    vocab. (The 16-bit logits, 2 B, are freed with the model output before backward; the forward peak,
    2 + 4 + 4 = 10 B, is lower.) Gemma-2's final logit softcapping keeps tanh's 16-bit output as well.
    Plus the final norm's fp32 copy and the lm_head input.
    """
    n_v = s.tokens_per_step * model.vocab_size
    per = 12
    if model.final_logit_softcapping:
        per += compute_bytes(s)
    return n_v * per + s.tokens_per_step * model.hidden_size * (4 + compute_bytes(s))


def lm_head_cast_bytes(model: ModelSpec, s: Settings, dense_dtype: str) -> int:
    """An fp32 lm_head under 16-bit autocast: F.linear runs on a bf16 copy of the weight, which autograd saves
    (it is needed for the input gradient) until the lm_head backward. The weight is frozen, so autocast's weight
    cache does not hold it: one copy per step."""
    c = compute_bytes(s)
    if s.method == "qlora" and dense_dtype == "fp32" and c < 4:
        return model.vocab_size * model.hidden_size * c
    return 0


def adapter_cast_bytes(adapter_params: int, s: Settings) -> int:
    """fp32 adapters under 16-bit autocast: the bf16 copies of lora_A/lora_B (cached by autocast for trainable
    leaves, saved by the matmuls). With gradient checkpointing the layer forward saves nothing, so the copies
    die with the autocast context before backward; without it they live until each layer's backward."""
    c = compute_bytes(s)
    if c < 4 and not s.gradient_checkpointing:
        return adapter_params * c
    return 0


def dequant_transient_bytes(model: ModelSpec, s: Settings, largest_quantized_numel: int) -> int:
    """QLoRA matmuls dequantize the whole 4-bit weight to the compute dtype first (bitsandbytes MatMul4Bit
    backward: `F.dequantize_4bit(B, state).to(grad.dtype)`; the CUDA forward does the same for batched input)."""
    return largest_quantized_numel * compute_bytes(s) if s.method == "qlora" else 0
