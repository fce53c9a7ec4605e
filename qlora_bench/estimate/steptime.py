"""Step time from the operations of one training step: each kernel priced by what bounds it, launched by a host that
has its own cost per launch, through a launch queue (pure Python, no torch).

The inventory: per decoder layer and for the head, the kernels a step of the runner's loop (run/train.py: forward
under autocast, loss, backward, optimizer step, zero_grad(set_to_none)) launches, in the order they run:
forward, and under gradient checkpointing the layer's recompute just before its backward. Their counts per layer
are what `qlora-bench trace` records for the real libraries (transformers' Llama decoder layer, peft's LoRA
Linear, bitsandbytes' Linear4bit; tests/test_steptime.py checks the totals against committed trace op counts);
their shapes are the model's.

Each kernel's GPU time is a roofline with a floor: max(FLOPs / (peak x e), bytes / (bandwidth x e_bw), t_min), with
e = e_mm for GEMMs (a rank-16 LoRA GEMM moves more bytes than it computes and lands on the bandwidth side) and
e_attn for attention. Its host time is what issuing it costs: c_py for a kernel issued from Python (forward and the
recompute, the optimizer's per-tensor loop), c_eng for one issued by autograd's C++ engine (backward), plus c_mod per
Python-level module / autograd.Function call (peft's LoRA layers, bitsandbytes' MatMul4Bit, checkpoint hooks).

The queue: the host launches kernel after kernel; the GPU runs each once it is launched and the previous one is done
(one stream). With b the GPU's backlog when the host finishes a launch, a kernel of host cost h and GPU time g gives
b' = max(b - h, 0) + g; the step ends when the GPU drains after the last launch (the runner synchronizes per step):
step = sum(h) + b_final. The map b -> max(b + (g - h), g) composes (max(x + A, B) is closed under composition), so
a layer's kernels reduce to one pair (A, B) and L identical layers to (L A, B + max(0, (L - 1) A)): exact for the
queue, and a 70B step costs one layer's kernels. Short steps are host-bound (an 8B QLoRA step of 512 tokens takes
about as long as one of 2,048), long ones GPU-bound, and the queue gives the overlap between.

The seven constants (THETA_KEYS) are fitted per GPU class by calibration.fit_step_time from committed records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..profiles import GpuSpec, ModelSpec
from ..settings import Settings
from .adapters import target_modules
from .dtypes import nbytes
from .optimizer import MIN_8BIT_SIZE
from .optimizer import Trainable as _Trainable
from .weights import quantized_modules

MM, ATTN, MEM, HOST = range(4)  # what bounds a kernel (HOST: a Python call that launches nothing)
PY, ENG = range(2)  # who issues it

THETA_KEYS = ("e_mm", "e_attn", "e_bw", "t_min", "c_py", "c_eng", "c_mod")

# torch's multi-tensor apply (aten/src/ATen/native/cuda/MultiTensorApply.cuh): one launch per 36 tensors (depth 4:
# param, grad, exp_avg, exp_avg_sq) or per 320 blocks of 65,536 elements, whichever comes first
FUSED_ADAM_TENSORS, FUSED_ADAM_BLOCKS, CHUNK = 36, 320, 65536


@dataclass(frozen=True)
class Op:
    bound: int  # MM, ATTN, MEM, HOST
    flops: float
    bytes: float
    issuer: int  # PY, ENG
    n: int = 1  # identical kernels


@dataclass(frozen=True)
class Block:
    """Kernels that run `repeat` times in a row (a decoder layer's forward: num_layers times), or a sequence of
    blocks repeated together (`inner`: the micro-batches of gradient accumulation)."""

    ops: tuple[Op, ...] = ()
    repeat: int = 1
    inner: tuple = ()


class _Layer:
    """Shapes of one decoder layer's step for one micro-batch."""

    def __init__(self, m: ModelSpec, s: Settings):
        self.m, self.s = m, s
        self.T = s.batch * s.seq
        self.E = nbytes(s.compute_dtype) if s.compute_dtype != "fp32" else 4
        self.targets = {t.name for t in target_modules(m, s)} if s.uses_adapters else set()
        self.quantized = {q.name for q in quantized_modules(m)} if s.method == "qlora" else set()
        self.upcast = s.method == "qlora" and s.upcast_non_quantized


def _mm(T: int, k: int, n: int, E: int, issuer: int, count: int = 1) -> Op:
    """[T, k] @ [k, n] in E-byte elements."""
    return Op(MM, 2.0 * T * k * n, (T * k + k * n + T * n) * E, issuer, count)


def _mem(elems: float, bytes_per_elem: float, issuer: int, n: int = 1) -> Op:
    return Op(MEM, 0.0, elems * bytes_per_elem, issuer, n)


def _host(issuer: int, n: int) -> Op:
    return Op(HOST, 0.0, 0.0, issuer, n)


def _norm_fwd(T: int, h: int, E: int, D: int) -> list[Op]:
    """transformers' RMSNorm: to(fp32), pow, mean, + eps, rsqrt, mul, to(dtype), weight * (8 kernels, 1 module;
    an fp32 weight after peft's upcast adds autocast's copy of the product)."""
    x = T * h
    return ([_mem(x, E + 4, PY)] if D == 4 and E < 4 else []) + [
        _mem(x, E + 4, PY),
        _mem(x, 8, PY),
        _mem(x, 4, PY),
        _mem(T, 8, PY, 2),
        _mem(x, 12, PY),
        _mem(x, 4 + E, PY),
        _mem(x, 2 * E + D, PY),
        _host(PY, 1),
    ]


def _linear_fwd(L: _Layer, name: str, fin: int, fout: int, count: int = 1) -> list[Op]:
    T, E, s = L.T, L.E, L.s
    ops = []
    if name in L.quantized:
        # MatMul4Bit: dequantize the absmax (double quantization), the 4-bit weight to 16-bit, clone, GEMM
        w = fin * fout * count
        if s.double_quant:
            ops.append(_mem(w / s.blocksize, 5, PY))
        ops += [_mem(w, 0.5 + E, PY), _mem(T * fin, 2 * E, PY), _host(PY, 1)]
    ops.append(_mm(T, fin, fout * count, E, PY))
    ops.append(_host(PY, 1))
    if name in L.targets:
        r = L.s.rank
        # peft LoRA Linear: dropout, x.to(fp32), autocast's casts of x and of lora_A / lora_B, two GEMMs, * scaling,
        # + result; modules: the LoRA layer's lora_A, lora_B, dropout
        if s.dropout:
            ops.append(_mem(T * fin, 2 * E + 1, PY))
        ops += [
            _mem(T * fin, E + 4, PY),
            _mem(T * fin, 4 + E, PY),
            _mem(r * (fin + fout) * count, 4 + E, PY, 2),
            _mm(T, fin, r, E, PY),
            _mm(T, r, fout * count, E, PY),
            _mem(T * fout * count, 2 * E, PY),
            _mem(T * fout * count, 3 * E, PY),
            _host(PY, 3),
        ]
    return ops


def _linear_bwd(L: _Layer, name: str, fin: int, fout: int, count: int = 1) -> list[Op]:
    T, E, s = L.T, L.E, L.s
    ops = []
    if name in L.quantized:  # MatMul4Bit.backward (Python): dequantize again, grad @ W
        w = fin * fout * count
        if s.double_quant:
            ops.append(_mem(w / s.blocksize, 5, ENG))
        ops += [_mem(w, 0.5 + E, ENG), _mem(T * fin, 3 * E, ENG, 3), _host(PY, 1)]
    ops.append(_mm(T, fout * count, fin, E, ENG))  # input gradient
    if s.method == "full":
        ops.append(_mm(fout * count, T, fin, E, ENG))  # weight gradient
    if name in L.targets:
        r = s.rank
        ops += [
            _mm(T, fout * count, r, E, ENG),  # lora_B: input gradient
            _mm(fout * count, T, r, E, ENG),  # lora_B: weight gradient
            _mm(T, r, fin, E, ENG),  # lora_A: input gradient
            _mm(r, T, fin, E, ENG),  # lora_A: weight gradient
            _mem(T * fout * count, 2 * E, ENG),  # * scaling
            _mem(T * fin, 2 * E + 1, ENG),  # dropout
            _mem(T * fin, E + 4, ENG, 2),  # the casts' backward
            _mem(r * (fin + fout) * count, 4 + E, ENG, 2),
        ]
    return ops


def _attention(L: _Layer, backward: bool) -> list[Op]:
    m, s, T, E = L.m, L.s, L.T, L.E
    b, S = s.batch, s.seq
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    qkv_bytes = T * (2 * q + 2 * kv) * E
    if s.attn == "eager":
        # repeat_kv (2 copies), QK^T, * scale, + mask, softmax in fp32 (2 casts), PV; the full square is computed
        sq = b * m.num_heads * S * S
        f = 2.0 * b * m.num_heads * S * S * m.head_dim
        fwd = [
            _mem(T * q, 2 * E, PY, 2),
            Op(ATTN, f, qkv_bytes + sq * E, PY),
            _mem(sq, 2 * E, PY, 2),
            _mem(sq, E + 4, PY),
            _mem(sq, 8, PY),
            _mem(sq, 4 + E, PY),
            Op(ATTN, f, qkv_bytes + sq * E, PY),
            _mem(T * q, 2 * E, PY),
        ]
        if not backward:
            return fwd
        return [Op(ATTN, 2 * f, qkv_bytes + 2 * sq * E, ENG, 2), _mem(sq, 12, ENG, 3), _mem(T * q, 3 * E, ENG, 4)]
    # SDPA (flash / memory-efficient): causal, half the square; the backward does 2.5x the forward's GEMM work
    f = 2.0 * b * m.num_heads * S * S * m.head_dim
    if backward:
        return [Op(ATTN, 2.5 * f, 2 * qkv_bytes, ENG)]
    return [Op(ATTN, f, qkv_bytes, PY)]


def _rotary(L: _Layer, backward: bool) -> list[Op]:
    """q * cos + rotate_half(q) * sin for q and k: mul, neg, cat, mul, add each (backward: 6 each)."""
    m, T, E = L.m, L.T, L.E
    ops = []
    for width in (m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim):
        x = T * width
        ops.append(_mem(x, 3 * E, ENG if backward else PY, 6 if backward else 5))
    return ops


def layer_forward(L: _Layer) -> list[Op]:
    m, T, E, h = L.m, L.T, L.E, L.m.hidden_size
    D = 4 if L.upcast else E
    ops: list[Op] = []
    norms = m.norms_per_layer
    ops += _norm_fwd(T, h, E, D)
    for mod in m.layer_modules():
        if mod.group == "attn":
            ops += _linear_fwd(L, mod.name, mod.in_features, mod.out_features, mod.count)
    ops += _rotary(L, False)
    ops += _attention(L, False)
    ops.append(_mem(T * h, 3 * E, PY))  # residual
    ops += _norm_fwd(T, h, E, D) * (norms - 1)
    ops += _mlp(L, False)
    ops.append(_mem(T * h, 3 * E, PY))  # residual
    ops.append(_host(PY, 4))  # decoder layer, attention, MLP, activation modules
    return ops


def _mlp(L: _Layer, backward: bool) -> list[Op]:
    m, T, E = L.m, L.T, L.E
    i = m.intermediate_size
    ops: list[Op] = []
    issuer = ENG if backward else PY
    mlp = [mod for mod in m.layer_modules() if mod.group != "attn"]
    if m.is_moe:
        # router GEMM + softmax / top-k, then grouped GEMMs over T x k rows (transformers' grouped_mm experts)
        k, e = m.experts_per_token, m.num_experts
        h = m.hidden_size
        rows = T * k
        f = 2.0 * rows * h * 3 * i
        w = e * 3 * h * i * E
        ops.append(_mm(T, h, e, E, issuer))
        ops.append(_mem(T * e, 12, issuer, 4))
        ops.append(Op(MM, f * (2 if backward else 1), (rows * (h + 3 * i) * E) * 2 + w, issuer, 2))
        ops.append(_mem(rows * h, 3 * E, issuer, 4))  # gather, restore, weight
        if L.s.uses_adapters and any(x.group == "expert" for x in target_modules(m, L.s)):
            # peft ParamWrapper: W' = W + B A per expert stack, every forward (and its gradient in backward)
            ops.append(_mem(e * 3 * h * i, 3 * E, issuer, 2))
            if L.s.method == "full" or backward:
                ops.append(_mem(e * 3 * h * i, 3 * E, issuer, 2))
        if L.s.method == "full" and backward:
            ops.append(Op(MM, f, w * 2, issuer, 2))
        return ops
    for mod in mlp:
        ops += (_linear_bwd if backward else _linear_fwd)(L, mod.name, mod.in_features, mod.out_features, mod.count)
    # act(gate) * up (silu / gelu): 2 kernels forward, 3 backward
    ops.append(_mem(T * i, 3 * E, issuer, 3 if backward else 2))
    return ops


def layer_backward(L: _Layer) -> list[Op]:
    m, T, E, h = L.m, L.T, L.E, L.m.hidden_size
    ops: list[Op] = []
    ops.append(_mem(T * h, 3 * E, ENG, 2))  # residual gradients meet
    ops += _mlp(L, True)
    # RMSNorm backward: 17 kernels each (the pow / mean / rsqrt chain, the casts, the weight's; trace counts)
    ops.append(_mem(T * h, 12, ENG, 17 * m.norms_per_layer))
    ops += _attention(L, True)
    ops += _rotary(L, True)
    for mod in m.layer_modules():
        if mod.group == "attn":
            ops += _linear_bwd(L, mod.name, mod.in_features, mod.out_features, mod.count)
    ops.append(_mem(T * h, 3 * E, ENG, 3))  # q / k / v input gradients summed
    if L.s.gradient_checkpointing:
        ops.append(_host(PY, 4))  # checkpoint's unpack hook and recompute bookkeeping
    return ops


def head_forward(L: _Layer) -> list[Op]:
    m, T, E = L.m, L.T, L.E
    V, h = m.vocab_size, m.hidden_size
    D = 4 if L.upcast else E
    ops = [_mem(T * h, 2 * D, PY), _mem(T * m.head_dim, 8, PY, 20)]  # embedding, rotary tables and mask (~20 small)
    ops += _norm_fwd(T, h, E, D)
    ops.append(_mm(T, h, V, E, PY))  # lm_head
    if L.upcast:
        ops.append(_mem(V * h, 4 + E, PY))  # autocast's copy of the fp32 lm_head
    ops += [_mem(T * V, E + 4, PY), _mem(T * V, 8, PY), _mem(T, 8, PY), _host(PY, 6)]  # logits.float(), log_softmax
    return ops


def head_backward(L: _Layer) -> list[Op]:
    m, T, E = L.m, L.T, L.E
    V, h = m.vocab_size, m.hidden_size
    ops = [_mem(T * V, 8, ENG, 2), _mem(T * V, 12, ENG), _mem(T * V, 4 + E, ENG)]  # nll, log_softmax, cast back
    ops.append(_mm(T, V, h, E, ENG))
    if L.s.method == "full":
        ops.append(_mm(V, T, h, E, ENG))
        ops.append(_mem(V * h, E, ENG))  # the embedding's gradient (dense)
    ops.append(_mem(T * h, 12, ENG, 12))  # the final norm
    return ops


def optimizer_ops(m: ModelSpec, s: Settings, tensors: list[_Trainable]) -> list[Op]:
    """optimizer.step(): bitsandbytes' optimizers loop over parameters in Python (one update kernel each); torch's
    fused AdamW runs multi-tensor kernels; foreach AdamW about a dozen of them per step."""
    kind = s.optimizer_kind
    ops: list[Op] = []
    n_tensors = sum(t.count for t in tensors)
    numel = sum(t.numel * t.count for t in tensors)
    if n_tensors == 0:
        return ops
    for t in tensors:
        p = t.dtype_bytes
        if kind in ("adamw_8bit", "paged_adamw_8bit"):
            states = 2 if t.numel >= MIN_8BIT_SIZE else 8
            ops.append(Op(MEM, 0.0, t.numel * (3 * p + 2 * states), PY, t.count))
            ops.append(_host(PY, t.count))
        elif kind == "paged_adamw_32bit":
            ops.append(Op(MEM, 0.0, t.numel * (3 * p + 16), PY, t.count))
            ops.append(_host(PY, t.count))
        elif kind == "adafactor":
            ops.append(Op(MEM, 0.0, t.numel * 6 * p, PY, 12 * t.count))
        elif kind == "sgd":
            ops.append(Op(MEM, 0.0, t.numel * 3 * p, PY, t.count))
    if kind in ("adamw_torch", "adamw_torch_fused"):
        p = tensors[0].dtype_bytes
        launches = max(math.ceil(n_tensors / FUSED_ADAM_TENSORS), math.ceil(numel / CHUNK / FUSED_ADAM_BLOCKS))
        per = numel * 7 * p / launches
        ops.append(Op(MEM, 0.0, per, PY, launches * (1 if kind == "adamw_torch_fused" else 12)))
    return ops


def accumulate_ops(tensors: list[_Trainable]) -> list[Op]:
    """Micro-batches after the first add into .grad (AccumulateGrad, in place)."""
    return [Op(MEM, 0.0, t.numel * 3 * t.dtype_bytes, ENG, t.count) for t in tensors]


@lru_cache(maxsize=512)
def step_blocks(model: ModelSpec, s: Settings) -> tuple[Block, ...]:
    """The step's kernels in launch order, as blocks (a layer's repeated num_layers times)."""
    from . import trainable_tensors  # (estimate/__init__.py imports this module's users)

    s = s.validated()
    L = _Layer(model, s)
    n = model.num_layers
    fwd, bwd = tuple(layer_forward(L)), tuple(layer_backward(L))
    gc = s.gradient_checkpointing
    if gc:
        fwd = (*fwd, _host(PY, 2))  # checkpoint(): the wrapper and its saved-tensor hooks
    micro = (
        Block(tuple(head_forward(L))[:2]),
        Block(fwd, n),
        Block(tuple(head_forward(L))[2:]),
        Block(tuple(head_backward(L))),
        Block((*fwd, *bwd) if gc else bwd, n),
    )
    tensors = trainable_tensors(model, s)
    blocks = [Block(inner=micro)]
    if s.grad_accum > 1:  # the later micro-batches also add into .grad
        blocks.append(Block(inner=(*micro, Block(tuple(accumulate_ops(tensors)))), repeat=s.grad_accum - 1))
    blocks.append(Block(tuple(optimizer_ops(model, s, tensors))))
    return tuple(blocks)


def _pair(ops: tuple[Op, ...], theta: dict, peak: float, bw: float) -> tuple[float, float, float]:
    """(A, B, host seconds) of a kernel sequence: the backlog map b -> max(b + A, B)."""
    e_mm, e_attn, e_bw, t_min = peak * theta["e_mm"], peak * theta["e_attn"], bw * theta["e_bw"], theta["t_min"]
    host_cost = (theta["c_py"], theta["c_eng"])
    c_mod = theta["c_mod"]
    A, B, H = 0.0, 0.0, 0.0  # the identity on backlogs >= 0: max(b + 0, 0)
    for op in ops:
        bound, n = op.bound, op.n
        if bound == HOST:
            h, g = c_mod, 0.0
        else:
            g = op.bytes / e_bw
            if bound == MM:
                g = max(op.flops / e_mm, g)
            elif bound == ATTN:
                g = max(op.flops / e_attn, g)
            if g < t_min:
                g = t_min
            h = host_cost[op.issuer]
        # one kernel: b -> max(b + g - h, g); n of them: (n (g - h), g + max(0, (n - 1)(g - h)))
        a = g - h
        A += n * a
        B = max(B + n * a, g + (n - 1) * a if a > 0 else g)
        H += n * h
    return A, B, H


def _compose(blocks, theta: dict, peak: float, bw: float) -> tuple[float, float, float, float]:
    """(A, B, host seconds, GPU seconds) of blocks in order, each repeated: maps max(b + A1, B1) then max(b + A2, B2)
    compose to max(b + A1 + A2, max(B1 + A2, B2)); n repeats of (A, B) are (n A, B + max(0, (n - 1) A))."""
    A = B = host = gpu = 0.0
    for blk in blocks:
        if blk.inner:
            a, b, h, g = _compose(blk.inner, theta, peak, bw)
        else:
            a, b, h = _pair(blk.ops, theta, peak, bw)
            g = a + h  # sum(g - h) + sum(h)
        n = blk.repeat
        A, B = A + n * a, max(B + n * a, b + max(0.0, (n - 1) * a))
        host += n * h
        gpu += n * g
    return A, B, host, gpu


def simulate(blocks, theta: dict, peak: float, bw: float) -> tuple[float, float, float]:
    """(step seconds, host seconds, GPU-busy seconds) of the blocks through the launch queue, from an empty queue
    (the runner synchronizes after each step)."""
    A, B, host, gpu = _compose(blocks, theta, peak, bw)
    return host + max(A, B, 0.0), host, gpu


# What the constants can physically be (the fit stays inside; the calibration schema refuses what is outside):
# efficiencies are fractions of a datasheet peak; a kernel's floor and a launch's host cost are microseconds to
# tens of microseconds on any GPU and CPU measured (10 ms refuses only nonsense); a Python module call, about 100 us.
THETA_BOUNDS = {
    "e_mm": (0.01, 1.0),
    "e_attn": (0.01, 1.0),
    "e_bw": (0.01, 1.0),
    "t_min": (1e-9, 1e-3),
    "c_py": (1e-9, 1e-2),
    "c_eng": (1e-9, 1e-2),
    "c_mod": (1e-9, 1e-1),
}


@dataclass(frozen=True)
class StepTimeModel:
    """The fitted constants per measured GPU profile (calibration.json "step_time"), and how a GPU without
    measurements borrows them: efficiencies are fractions of its own datasheet peak and bandwidth, host costs
    are the CPU's (a different host CPU changes them: that is the transfer's uncertainty)."""

    classes: dict  # GPU profile name -> {"theta": {...}, "loo_rel_error": {...}, ...}

    @classmethod
    def from_calibration(cls, d: dict | None) -> StepTimeModel | None:
        classes = {k: v for k, v in (d or {}).items() if isinstance(v, dict) and "theta" in v}
        return cls(classes) if classes else None

    def constants_for(self, gpu: GpuSpec) -> tuple[dict, str]:
        """(theta, the GPU profile it was fitted on): the GPU's own, else the measured class with the most records."""
        if gpu.name in self.classes:
            return self.classes[gpu.name]["theta"], gpu.name
        name = max(self.classes, key=lambda k: (len(self.classes[k].get("fitted_on", [])), k))
        return self.classes[name]["theta"], name

    def uncertainty(self, gpu: GpuSpec) -> float:
        """The band: the worst leave-one-out relative step-time error of the class the constants come from."""
        _, name = self.constants_for(gpu)
        loo = self.classes[name].get("loo_rel_error") or {}
        return max((abs(v) for v in loo.values()), default=0.0)

    def step_seconds(self, model: ModelSpec, s: Settings, gpu: GpuSpec) -> float | None:
        t = self.breakdown(model, s, gpu)
        return None if t is None else t[0]

    def breakdown(self, model: ModelSpec, s: Settings, gpu: GpuSpec) -> tuple[float, float, float] | None:
        """(step, host, GPU-busy) seconds; None for fp32 compute (the profiles carry 16-bit tensor-core peaks only)
        or a GPU without a peak and bandwidth."""
        if s.compute_dtype == "fp32" or not gpu.dense_tflops or not gpu.memory_bandwidth_GBps:
            return None
        theta = self.constants_for(gpu)[0]
        return simulate(step_blocks(model, s), theta, gpu.dense_tflops * 1e12, gpu.memory_bandwidth_GBps * 1e9)

    def tokens_per_second(self, model: ModelSpec, s: Settings, gpu: GpuSpec) -> float | None:
        t = self.step_seconds(model, s, gpu)
        return None if not t else s.batch * s.seq * s.grad_accum / t
