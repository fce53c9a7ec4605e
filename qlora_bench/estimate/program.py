"""One training step as the caching allocator sees it: every tensor allocation and free, in program order.

The phase model (estimate/__init__.py) sums what is alive at the worst moment of each phase; that gives the
allocated peak but not the reserved one, which depends on the order and sizes of the requests (the caching
allocator keeps freed blocks in segments that later requests of other sizes may not fit). This module runs the
step the runner performs (`qlora_bench.run.train`: load, forward under autocast, loss, backward, optimizer step,
zero_grad) on symbolic tensors and emits the events `estimate/allocator.py` replays:
("alloc", key, nbytes, tag) / ("free", key) / ("phase", name).

How it stays faithful without torch:
- Frees follow Python's reference counting, as torch's do: a symbolic tensor frees its block when its last
  reference goes (`Sym.__del__`), so the layer code below is written like the library code it mirrors
  (transformers' Llama-family decoder layer, peft's LoRA layers, bitsandbytes' Linear4bit / MatMul4Bit).
- A small autograd: each op that has an input needing a gradient records a node with the tensors its derivative
  formula saves (torch's derivatives.yaml); backward runs nodes in reverse creation order (torch's engine picks
  the ready node with the highest sequence number), allocates each input gradient, sums gradients that meet
  out of place (InputBuffer), releases a node's saved tensors after it ran, and accumulates leaf gradients into
  `.grad` (kept until zero_grad).
- Non-reentrant gradient checkpointing keeps a layer's inputs only; the layer's backward first recomputes its
  forward with saving on, then runs it backward.
- autocast: 16-bit copies of fp32 inputs per use; copies of trainable fp32 leaves (LoRA weights) are cached
  until the autocast region ends (autocast_mode.cpp: cached_casts).
Checked against `qlora-bench trace` (the real libraries on fake CUDA tensors) in tests/test_program.py, and the
live bytes against the phase model. The real CUDA kernels are modelled where a CPU build decomposes them
(silu_backward is one kernel, one output).
"""

from __future__ import annotations

import heapq

from ..profiles import ModelSpec
from ..settings import Settings
from .adapters import target_modules
from .dtypes import nbytes
from .optimizer import BNB_8BIT_BLOCKSIZE, MIN_8BIT_SIZE, PAGED_MIN_NUMEL
from .quantization import quantized_tensor_bytes

# Tags: the estimate's component names (estimate.LABELS), so that the replay's live bytes per tag at the peak is
# the breakdown `plan` prints.
W4, QUANT, DENSE, ADAPTERS = "weights_4bit", "quant_constants", "weights_dense", "lora_adapters"
GRAD, OPT, OPT_TEMP, WORK, INPUT, LOAD = (
    "gradients",
    "optimizer_states",
    "optimizer_step_temp",
    "cublas_workspace",
    "inputs",
    "load_transient",
)
ACT, RECOMPUTE, IN_FLIGHT, LOSS, HEAD_CAST, ADAPTER_CASTS, DEQUANT, TEMP = (
    "activations",
    "recompute_layer",
    "grads_in_flight",
    "loss_head",
    "lm_head_cast",
    "adapter_casts",
    "dequant_transient",
    "temporaries",
)
PERSISTENT_TAGS = (W4, QUANT, DENSE, ADAPTERS, OPT, WORK, INPUT)
LSE_BYTES = 4  # flash / efficient attention: one fp32 log-sum-exp per head and token
MICRO_BATCHES_SIMULATED = 3  # per optimizer step (program(): the rest repeat the second)


class Program:
    """The event list, the key counter, the autograd state."""

    def __init__(self):
        self.events: list[tuple] = []
        self.n = 0
        self.recording = True  # grad mode with saving (False inside a checkpointed layer's first forward)
        self.seq = 0  # node sequence numbers
        self.autocast_cache: list | None = None  # cached 16-bit copies of trainable fp32 leaves
        self.grads: list[Sym] = []  # trainable leaves whose .grad exists
        self.tag = TEMP  # what new tensors are, unless said otherwise
        self.trainable: list = []  # trainable parameters, as created
        self.shared: list = []  # what every layer takes besides the hidden states (rotary cos / sin, mask)
        self.workspace = None  # cuBLAS's, allocated at the first matmul
        # checkpoint early stop: tensors a checkpointed layer's first forward would have saved, how many its
        # recompute still has to save, and whether the recompute has stopped (later ops allocate nothing)
        self.saves = 0
        self.budget: int | None = None
        self.stopped = False
        self.stop_seq: int | None = None  # the node whose saves completed the recompute's budget

    def new(self, elems: int, eb: int, tag: str | None = None) -> Sym:
        k = self.n
        self.n += 1
        if self.stopped:
            return Ghost(self, k, elems, eb)
        self.events.append(("alloc", k, elems * eb, tag or self.tag))
        return Sym(self, k, elems, eb)

    def phase(self, name: str) -> None:
        self.events.append(("phase", name))


class Sym:
    """A symbolic tensor: `elems` elements of `eb` bytes; its block is freed with the last reference."""

    __slots__ = ("prog", "key", "elems", "eb", "node", "leaf", "grad")

    def __init__(self, prog: Program, key: int, elems: int, eb: int):
        self.prog, self.key, self.elems, self.eb = prog, key, elems, eb
        self.node = None  # the autograd node that made it (None: no gradient flows to it, or a leaf)
        self.leaf = False  # a trainable parameter: its gradient is accumulated into .grad
        self.grad = None

    @property
    def req(self) -> bool:
        return self.leaf or self.node is not None

    def __del__(self):
        self.prog.events.append(("free", self.key))


class Ghost(Sym):
    """An output of an op the recompute never reached (checkpoint early stop): no storage, nothing to free; its
    node still takes part in backward, as the original forward's node does."""

    __slots__ = ()

    def __del__(self):
        pass


class Node:
    __slots__ = ("seq", "inputs", "saved", "backward", "tag")

    def __init__(self, seq, inputs, saved, backward, tag=IN_FLIGHT):
        self.seq, self.inputs, self.saved, self.backward = seq, inputs, saved, backward
        self.tag = tag  # what its backward allocates: activation gradients, or the loss head's


PENDING = Node(0, (), (), None)  # a checkpointed first forward's node: needs a gradient, records nothing


def op(P: Program, out: Sym, inputs: tuple, saved: tuple, backward) -> Sym:
    """Record a node for `out` when recording and an input needs a gradient. `backward(P, g, saved)` returns
    one gradient (or None) per input. A checkpointed layer's first forward records nothing (its saved-tensor
    hooks drop everything) but counts what it would save; `checkpoint` gives the layer's output one node that
    recomputes it."""
    if any(t is not None and t.req for t in inputs):
        if not P.recording:
            P.saves += sum(t is not None for t in saved)
            out.node = PENDING
            return out
        if P.budget is not None and saved:
            _packed(P, sum(t is not None for t in saved), out)
        P.seq += 1
        # edges, as torch keeps them: the producer's node, or the leaf itself (never a non-leaf tensor)
        edges = tuple(None if t is None or not t.req else (t if t.leaf else t.node) for t in inputs)
        for e in edges:
            if e is not None and e.__class__ is Param:
                e.producers += 1
        out.node = Node(P.seq, edges, saved, backward, LOSS if P.tag == LOSS else IN_FLIGHT)
    return out


def _packed(P: Program, n: int, out: Sym | None) -> None:
    """The recompute saved `n` more tensors. torch's non-reentrant checkpoint stops recomputing once it has
    saved as many as the first forward did (early stop, the default; utils/checkpoint.py raises
    _StopRecomputationError from the pack hook): an op saving its inputs never computes its output (`out`, when
    it was the last allocation, is taken back), and nothing after it runs."""
    P.budget -= n
    if P.budget > 0:
        return
    P.budget, P.stopped = None, True
    P.stop_seq = P.seq + (1 if out is not None else 0)  # an input-saving op's node is numbered next
    if (
        out is not None
        and type(out) is Sym  # (a view, an alias or a parameter allocated nothing here)
        and P.events
        and P.events[-1][0] == "alloc"
        and P.events[-1][1] == out.key
    ):
        P.events.pop()
        out.__class__ = Ghost


class Alias(Sym):
    """The same storage under another autograd identity (checkpoint's detached input): frees nothing itself."""

    __slots__ = ("base",)

    def __init__(self, base: Sym):
        super().__init__(base.prog, base.key, base.elems, base.eb)
        self.base = base
        self.leaf = True  # collects the gradient that flows out of the recomputed layer

    def __del__(self):
        pass


def checkpoint(P: Program, fn, x: Sym) -> Sym:
    """torch.utils.checkpoint (use_reentrant=False): run `fn(x)` without saving, keep `x`; in backward run it
    again with saving on and backpropagate through the recomputed graph."""
    P.recording, P.saves = False, 0
    out = fn(x)
    P.recording = True
    saves = P.saves

    def backward(P, g, s):
        xa = Alias(s[0])
        ctx, tag = P.autocast_cache, P.tag
        P.autocast_cache, P.tag = [], RECOMPUTE  # the recompute runs in its own autocast region
        # a layer that saved nothing is never recomputed: nothing is ever unpacked (its nodes still run)
        P.budget, P.stopped, P.stop_seq = (saves or None), not saves, None
        start = len(P.events)
        y = fn(xa)
        P.budget, P.stopped = None, False
        P.autocast_cache, P.tag = ctx, tag
        mark, stop = len(P.events), P.stop_seq

        def first_unpack():
            # torch recomputes when backward first unpacks a saved tensor: the nodes after the stop point save
            # nothing and run before it, so what their backward emitted goes before the recompute's events
            moved = P.events[mark:]
            del P.events[mark:]
            P.events[start:start] = moved

        run_backward(P, y, g, stop, first_unpack)
        del y, g
        gx = xa.grad
        xa.grad = None
        return (gx,)

    P.seq += 1
    out.node = Node(P.seq, (None if not x.req else (x if x.leaf else x.node),), (x,), backward)
    return out


# ---- the autograd engine --------------------------------------------------------------------------------------
def run_backward(P: Program, root: Sym, g: Sym, pause: int | None = None, on_pause=None) -> None:
    """Backward from `root` with gradient `g`; trainable leaves get `.grad` (listed in P.grads when new).
    `on_pause()` runs once, before the first node numbered `pause` or lower."""
    buffers = {id(root.node): g}
    nodes = {id(root.node): root.node}
    heap = [(-root.node.seq, id(root.node))]
    del g
    while heap:
        _, nid = heapq.heappop(heap)
        node = nodes.pop(nid)
        if pause is not None and node.seq <= pause:
            on_pause()
            pause = None
        gout = buffers.pop(nid)
        P.tag = node.tag
        gins = node.backward(P, gout, node.saved)
        node.saved = node.backward = None  # release_variables(): what the node held goes once it ran
        del gout
        for edge, gi in zip(node.inputs, gins, strict=True):
            if edge is None:
                continue
            if isinstance(edge, Sym):
                _deliver(P, edge, gi)
                continue
            if gi is None:
                continue
            key = id(edge)
            if key in buffers:  # InputBuffer::accumulate: out of place
                old = buffers[key]
                buffers[key] = P.new(max(old.elems, gi.elems), max(old.eb, gi.eb))
                del old
            else:
                buffers[key] = gi
                nodes[key] = edge
                heapq.heappush(heap, (-edge.seq, key))
            del gi
        del gins, node
    P.tag = TEMP


def _grad_tag(param: Sym | None) -> str | None:
    """A parameter's gradient is .grad (gradients) unless it waits to be summed with another (a tied weight)."""
    if param is None:
        return None
    return IN_FLIGHT if getattr(param, "producers", 0) > 1 else GRAD


def _deliver(P: Program, leaf: Sym, g: Sym | None) -> None:
    """A gradient for a leaf. A parameter used by several ops (tied embeddings) has one AccumulateGrad node with one
    input buffer: the gradients wait there, summed out of place, until the last op that used it has delivered,
    and only then become .grad (torch's engine runs a node when all its dependencies are done)."""
    if leaf.__class__ is Param and leaf.producers > 1:
        leaf.producers -= 1
        if g is not None:
            old = leaf.pending
            leaf.pending = g if old is None else P.new(g.elems, max(old.eb, g.eb), IN_FLIGHT)
            del old
        return
    pending = getattr(leaf, "pending", None)  # the last (or only) delivery
    if pending is not None:
        leaf.pending = None
        g = pending if g is None else P.new(g.elems, max(pending.eb, g.eb), GRAD)  # the sum becomes .grad
        del pending
    if leaf.__class__ is Param:
        leaf.producers = 0
    if g is not None:
        _accumulate(P, leaf, g)


def _accumulate(P: Program, leaf: Sym, g: Sym) -> None:
    """AccumulateGrad: the first gradient becomes .grad (in the parameter's dtype), later ones add in place.
    A checkpoint's input alias only collects the gradient for the checkpoint to hand on."""
    if not isinstance(leaf, Param):  # a checkpoint's input alias; the embedding output under peft
        leaf.grad = g if leaf.grad is None else P.new(g.elems, g.eb)
        return
    if leaf.grad is None:
        leaf.grad = g if g.eb == leaf.eb else P.new(leaf.elems, leaf.eb)
        P.grads.append(leaf)


# ---- ops (shapes are element counts; eb = bytes per element) -----------------------------------------------
def cast(P: Program, x: Sym, eb: int) -> Sym:
    """x.to(dtype): a copy when the dtype changes; its backward casts the gradient back (into .grad when x is a
    trainable leaf: autocast's copy of an fp32 LoRA weight)."""
    if x.eb == eb:
        return x
    out = P.new(x.elems, eb)
    tag = GRAD if x.leaf else None
    return op(P, out, (x,), (), lambda P, g, s, n=x.elems, e=x.eb: (P.new(n, e, tag),))


def autocast_weight(P: Program, w: Sym, c: int) -> Sym:
    """autocast's copy of an fp32 weight; trainable leaves' copies are cached until the autocast region ends."""
    if w.eb == c:
        return w
    tag, P.tag = P.tag, (ADAPTER_CASTS if w.leaf else HEAD_CAST if P.tag == LOSS else P.tag)
    out = cast(P, w, c)
    P.tag = tag
    if w.leaf and P.autocast_cache is not None:
        P.autocast_cache.append(out)
    return out


def matmul(P: Program, x: Sym, w: Sym, rows: int, o: int, eb: int) -> Sym:
    """x [rows, n] @ w.T [n, o]: mm keeps x for the weight's gradient and w for the input's."""
    out = P.new(rows * o, eb)
    saved = (x if w.req else None, w if x.req else None)
    param = w if (w.__class__ is Param and w.eb == eb) else None  # its gradient becomes .grad as it is

    def backward(P, g, s, xe=x.elems, we=w.elems, xr=x.req, wr=w.req):
        # MmBackward / BmmBackward compute the second operand's gradient first (seen in `trace`)
        gw = P.new(we, eb, _grad_tag(param)) if wr else None
        gx = P.new(xe, eb) if xr else None
        return gx, gw

    return op(P, out, (x, w), saved, backward)


def mul(P: Program, a: Sym, b: Sym, eb: int | None = None) -> Sym:
    """Elementwise product (b may broadcast); each operand is kept for the other's gradient. A broadcast
    operand's gradient is the full product summed down to its size."""
    eb = eb or max(a.eb, b.eb)
    n = max(a.elems, b.elems)
    out = P.new(n, eb)
    saved = (b if a.req else None, a if b.req else None)

    def grad(P, e, b_, leaf):
        full = P.new(n, eb)
        if e == n and b_ == eb:
            return full
        return P.new(e, b_, GRAD if leaf else None)

    def backward(P, g, s, ae=a.elems, be=b.elems, aeb=a.eb, beb=b.eb, ar=a.req, br=b.req, al=a.leaf, bl=b.leaf):
        return (grad(P, ae, aeb, al) if ar else None, grad(P, be, beb, bl) if br else None)

    return op(P, out, (a, b), saved, backward)


def scale(P: Program, a: Sym) -> Sym:
    """a * (python scalar), a + eps: nothing saved; the gradient is g * scalar (or g itself)."""
    out = P.new(a.elems, a.eb)
    return op(P, out, (a,), (), lambda P, g, s, n=a.elems, e=a.eb: (P.new(n, e),))


def add(P: Program, a: Sym, b: Sym) -> Sym:
    """a + b with dtype promotion: gradients pass through (cast when an operand's dtype differs)."""
    eb = max(a.eb, b.eb)
    out = P.new(max(a.elems, b.elems), eb)

    def backward(P, g, s, aeb=a.eb, beb=b.eb):
        ga = g if aeb == eb else P.new(g.elems, aeb)
        gb = g if beb == eb else P.new(g.elems, beb)
        return ga, gb

    return op(P, out, (a, b), (), backward)


def elementwise(P: Program, x: Sym, keep_input: bool = False, out_elems: int | None = None, eb: int | None = None):
    """A one-input kernel (pow, silu, rsqrt, mean, softmax...); backward is one kernel producing the input
    gradient. (A kernel that keeps its own output, as rsqrt does, is modelled by the consumer that keeps it too:
    a node holding its own output would be a reference cycle, which torch breaks with a weak SavedVariable.)"""
    out = P.new(x.elems if out_elems is None else out_elems, eb or x.eb)
    return op(P, out, (x,), (x if keep_input else None,), lambda P, g, s, n=x.elems, e=x.eb: (P.new(n, e),))


class View(Sym):
    """Part of another tensor's storage (a slice, a chunk): allocates and frees nothing, keeps the base alive."""

    __slots__ = ("base",)

    def __init__(self, base: Sym, elems: int):
        super().__init__(base.prog, base.key, elems, base.eb)
        self.base = base

    def __del__(self):
        pass


def view(P: Program, x: Sym, elems: int) -> Sym:
    """A slice of `x`; its backward writes the slice's gradient into a zero tensor of x's size (slice_backward)."""
    return op(P, View(x, elems), (x,), (), lambda P, g, s, n=x.elems, e=x.eb: (P.new(n, e),))


def keeps_output(P: Program, x: Sym, eb: int) -> Sym:
    """A one-input kernel whose backward uses its own output (softmax, _safe_softmax, tanh): the node holds the
    output (a reference cycle that running the node breaks), packed after the op computed it."""
    out = op(P, P.new(x.elems, eb), (x,), (), lambda P, g, s, n=x.elems, e=x.eb: (P.new(n, e),))
    if out.node is PENDING:
        P.saves += 1
    elif out.node is not None:
        out.node.saved = (out,)
        if P.budget is not None:
            _packed(P, 1, None)
    return out


def softmax(P: Program, x: Sym) -> Sym:
    """softmax(dtype=float32) keeps its fp32 output."""
    return keeps_output(P, x, 4)


def tanh(P: Program, x: Sym) -> Sym:
    """tanh keeps its output for backward (tanh_backward(grad, result))."""
    return keeps_output(P, x, x.eb)


def clone(P: Program, x: Sym) -> Sym:
    out = P.new(x.elems, x.eb)
    return op(P, out, (x,), (), lambda P, g, s: (g,))


def dropout(P: Program, x: Sym, p: float) -> Sym:
    """native_dropout: output + a bool mask (kept for backward; freed at once when nothing records)."""
    if p <= 0:
        return x
    out = P.new(x.elems, x.eb)
    mask = P.new(x.elems, 1)
    return op(P, out, (x,), (mask,), lambda P, g, s, n=x.elems, e=x.eb: (P.new(n, e),))


# ---- model blocks ---------------------------------------------------------------------------------------------
class Layout:
    """Sizes and dtypes of one configuration (the dtype rules are activations.py's)."""

    def __init__(self, model: ModelSpec, s: Settings):
        self.m, self.s = model, s
        self.T = s.tokens_per_step
        self.c = nbytes(s.compute_dtype)
        self.autocast = self.c < 4
        self.qlora, self.full = s.method == "qlora", s.method == "full"
        upcast = self.qlora and s.upcast_non_quantized
        self.dense = 4 if (upcast or s.compute_dtype == "fp32") else self.c  # embeddings, norms, lm_head
        self.targets = {m.name for m in target_modules(model, s)} if s.uses_adapters else set()
        self.modules = model.layer_modules()
        self.windowed = windowed_layers(model, s)
        # bitsandbytes converts nn.Linear only: fused MoE experts stay dense (and fp32 after peft's upcast)
        self.quantized = {m.name for m in self.modules if m.is_linear} if self.qlora else set()


def windowed_layers(model: ModelSpec, s: Settings) -> set[int]:
    """Layers whose sliding window the sequence reaches (transformers then builds and passes a mask, under sdpa
    too): Mistral's, Phi-3's, Mixtral's and Qwen2's (with use_sliding_window) every layer, Gemma-2's even
    (local) ones."""
    window = model.config.get("sliding_window")
    if not window or s.seq < window or s.attn == "flash_attention_2":  # FA2 applies the window itself, no mask
        return set()
    if model.model_type in ("mistral", "phi3", "mixtral") or (
        model.model_type == "qwen2" and model.config.get("use_sliding_window")
    ):
        return set(range(model.num_layers))
    if model.model_type == "gemma2":
        return set(range(0, model.num_layers, 2))
    return set()


def _normalized(P: Program, L: Layout, x: Sym) -> Sym:
    """Both RMSNorms' start: h = x.to(fp32); h * rsqrt(h.pow(2).mean(-1) + eps), fp32 (h goes as it returns)."""
    h32 = cast(P, x, 4)
    var = elementwise(P, h32, keep_input=True)  # pow(2)
    var2 = elementwise(P, var, out_elems=L.T)  # mean(-1): its backward expands to the full size
    del var
    var3 = scale(P, var2)  # + eps
    del var2
    rs = elementwise(P, var3, keep_input=True)  # rsqrt
    del var3
    return mul(P, h32, rs)


def rmsnorm(P: Program, L: Layout, x: Sym, w: Sym) -> Sym:
    """LlamaRMSNorm: weight * normalized.to(input dtype); the fp32 normalized x is a local until it returns."""
    if L.m.model_type == "gemma2":
        return gemma_rmsnorm(P, L, x, w)
    y32 = _normalized(P, L, x)
    y = cast(P, y32, x.eb)
    out = mul(P, w, y)
    del y, y32
    return out


def gemma_rmsnorm(P: Program, L: Layout, x: Sym, w: Sym) -> Sym:
    """Gemma2RMSNorm: (normalized * (1 + weight.float())).type_as(x): the product with the weight is fp32, cast
    back last."""
    n = _normalized(P, L, x)
    w1 = scale(P, cast(P, w, 4))  # 1.0 + weight.float(): a vector
    y = mul(P, n, w1)
    del n, w1
    return cast(P, y, x.eb)


def linear(P: Program, L: Layout, x: Sym, W: dict, name: str, n: int, o: int) -> Sym:
    """One projection: the base layer and, when targeted, peft's LoRA branch (scaled, added out of place)."""
    c, T = L.c, L.T
    w = W[name]
    if name in L.quantized:  # Linear4bit.forward: x.to(compute dtype); MatMul4Bit; result.to(input dtype)
        xc = cast(P, x, c)
        out = cast(P, _matmul_4bit(P, xc, n, o, c, T), x.eb)
        del xc  # the cast input is Linear4bit.forward's local until it returns
    else:
        xc = cast(P, x, c) if L.autocast else x
        out = matmul(P, xc, autocast_weight(P, w, c) if L.autocast else w, T, o, c if L.autocast else w.eb)
        del xc
    if name not in L.targets:
        return out
    if name in L.quantized:
        out = clone(P, out)  # peft bnb.Linear4bit: "defensively clone" the base result
    a, b = W[name + ".lora_A"], W[name + ".lora_B"]
    # peft's lora.Linear casts the adapter input to the adapter's dtype (fp32: `_cast_input_dtype`), bnb's
    # Linear4bit skips that under autocast; autocast then copies the (dropped-out) input to 16-bit for lora_A
    xa = x if name in L.quantized else cast(P, x, 4)
    d = dropout(P, xa, L.s.dropout)
    del xa
    dc = cast(P, d, c) if L.autocast else d
    del d
    e = c if L.autocast else 4
    h = matmul(P, dc, autocast_weight(P, a, c) if L.autocast else a, T, L.s.rank, e)
    del dc
    h2 = matmul(P, h, autocast_weight(P, b, c) if L.autocast else b, T, o, e)
    del h
    h3 = scale(P, h2)
    del h2
    return add(P, out, h3)


def _matmul_4bit(P: Program, x: Sym, n: int, o: int, c: int, T: int) -> Sym:
    """bitsandbytes MatMul4Bit: gemm_4bit forward; backward dequantizes the whole weight to the compute dtype
    (`F.dequantize_4bit(B, ctx.state).to(grad_output.dtype)`, bitsandbytes/autograd/_functions.py) and
    multiplies; the frozen weight needs no gradient."""
    out = P.new(T * o, c)

    def backward(P, g, s):
        wd = P.new(n * o, c, DEQUANT)
        gx = P.new(T * n, c)
        del wd
        return (gx,)

    return op(P, out, (x,), (), backward)


def rope(P: Program, x: Sym, cat_pass: bool = False) -> Sym:
    """apply_rotary_pos_emb: x * cos + rotate_half(x) * sin (rotate_half: cat(-x2, x1)); cos/sin need no
    gradient, so nothing sized by x is kept; backward: the two products' gradients and the cat's slices."""
    n = x.elems
    a = P.new(n, x.eb)  # x * cos
    ng = P.new(n // 2, x.eb)  # -x2
    cat = P.new(n, x.eb)
    del ng
    b = P.new(n, x.eb)  # rotate_half(x) * sin
    del cat
    out = P.new(n, x.eb)
    del a, b

    def backward(P, g, s, e=x.eb):
        m = P.new(n, e)  # g * sin
        ng = P.new(n // 2, e)
        s1 = P.new(n, e)  # slice_backward
        del ng
        s2 = P.new(n, e)
        del m
        r = P.new(n, e)  # their sum
        del s1, s2
        c = P.new(n, e)  # g * cos
        gx = P.new(n, e)
        del r, c
        return (gx,)

    out = op(P, out, (x,), (), backward)
    if cat_pass:  # Phi-3: torch.cat([rotated, pass-through], dim=-1), a copy even when nothing passes through
        return op(P, P.new(n, x.eb), (out,), (), lambda P, g, s: (g,))  # cat's backward slices: views
    return out


def attention(P: Program, L: Layout, q: Sym, k: Sym, v: Sym, windowed: bool = False) -> tuple[Sym, Sym | None]:
    """sdpa as a GPU runs it (sdp_utils.cpp on sm80/sm90: flash for 16-bit without a mask, with GQA; memory-
    efficient with a mask, after transformers repeats k and v to every head since it passes enable_gqa only
    without a mask), or transformers' eager attention (scores and probabilities materialized). `windowed`: a
    sliding-window layer whose window the sequence reaches, which gets a mask (masking_utils keeps the mask
    unless kv_length < the window). Returns the output and eager's attention weights (None for sdpa), which the
    attention module returns too."""
    m, T, c = L.m, L.T, L.c
    a, kvh, seq, b = m.num_heads, m.num_kv_heads, L.s.seq, L.s.batch
    rep = a // kvh
    backend = "eager" if L.s.attn == "eager" else sdpa_kernel(L, windowed)
    if backend == "math":
        return _math_attention(P, L, q, k, v, rep), None
    if backend == "flash":
        qc, kc, vc = (cast(P, t, c) for t in (q, k, v)) if L.autocast else (q, k, v)  # autocast's casts
        out = P.new(q.elems, qc.eb)
        lse = P.new(T * a, LSE_BYTES)

        def backward(P, g, s, qe=q.elems, ke=k.elems, eb=qc.eb):  # defaults, not a closure over qc
            return P.new(qe, eb), P.new(ke, eb), P.new(ke, eb)

        # flash keeps q, k, v, its output and the log-sum-exp (the node holding its own output is a cycle that
        # running the node breaks; a checkpointed forward records no node)
        out = op(P, out, (qc, kc, vc), (qc, kc, vc, out, lse), backward)
        if m.model_type == "phi3":
            # flash's output is empty_like(q) (flash_api.cpp), so it has q's memory order: Phi-3's q comes out of
            # torch.cat as [b, heads, s, d], and sdpa_attention_forward's transpose(1, 2).contiguous() copies it
            return clone(P, out), None
        return out, None
    # transformers repeats k and v to every head (repeat_kv) in the dtype they come in; autocast casts afterwards
    kr = elementwise(P, k, out_elems=k.elems * rep) if rep > 1 else k
    vr = elementwise(P, v, out_elems=v.elems * rep) if rep > 1 else v
    if backend == "efficient":
        # memory-efficient attention: the bool mask converted to an additive one per call
        # (convert_boolean_attn_mask), kept for backward with q, k, v, the output and a log-sum-exp padded to 32
        qc, kc, vc = (cast(P, t, c) for t in (q, kr, vr)) if L.autocast else (q, kr, vr)
        bias = P.new(b * seq * seq, qc.eb) if windowed else None  # without a mask: is_causal, no bias
        out = P.new(q.elems, qc.eb)
        lse = P.new(b * a * -(-seq // 32) * 32, LSE_BYTES)

        def backward(P, g, s, qe=q.elems, eb=qc.eb):
            return P.new(qe, eb), P.new(qe, eb), P.new(qe, eb)

        return op(P, out, (qc, kc, vc), (qc, kc, vc, out, lse, bias), backward), None
    # eager_attention_forward: q @ k^T (autocast casts both operands) * scaling, + the additive mask (in the
    # embedding's dtype: the sum promotes), softmax(dtype=fp32) (a cast unless already fp32), .to(q's dtype),
    # @ v (cast again), transpose(1, 2).contiguous()
    qc, kc = (cast(P, q, c), cast(P, kr, c)) if L.autocast else (q, kr)
    # torch.matmul folds [b, heads] into one batch dimension by reshape, which copies an operand whose memory is
    # [b, s, heads, d] (a transposed projection; rotary embedding keeps that layout, Phi-3's ends in torch.cat,
    # repeat_kv's output is contiguous) when b > 1; the bmm then keeps the copy instead
    qf = _folded(P, qc, b, phi3 := m.model_type == "phi3")
    kf = _folded(P, kc, b, phi3 or rep > 1)
    del qc, kc
    sc = matmul(P, qf, kf, 1, b * a * seq * seq, qf.eb)
    del qf, kf
    sc2 = scale(P, sc)
    del sc
    if m.attn_logit_softcapping:  # attn_weights = attn_weights / cap; tanh(attn_weights); attn_weights * cap
        d = scale(P, sc2)
        del sc2
        th = tanh(P, d)
        del d
        sc2 = scale(P, th)
        del th
    msk = add(P, sc2, P.shared[2])
    del sc2
    f = cast(P, msk, 4)
    pr = softmax(P, f)
    del f
    pq = cast(P, pr, q.eb)
    del msk, pr  # `attn_weights` is rebound only once `.to(query.dtype)` has returned
    pc, vc = (cast(P, pq, c), cast(P, vr, c)) if L.autocast else (pq, vr)
    vf = _folded(P, vc, b, rep > 1)  # Phi-3's v is a slice of the fused qkv output
    del vc
    out = matmul(P, pc, vf, 1, q.elems, pc.eb)
    del pc, vf
    o = clone(P, out)  # transpose(1, 2).contiguous(), before the function's locals (repeated k, v) go
    del out, kr, vr
    return o, pq


def sdpa_kernel(L: Layout, windowed: bool) -> str:
    """The kernel CUDA SDPA picks on sm80 / sm90 (sdp_utils.cpp; the trace's patches.sdpa_backend is the same
    rule): flash for 16-bit inputs without a mask and a head dim <= 256, a multiple of 8 (grouped-query heads
    natively); memory-efficient for 16- or 32-bit inputs without grouped-query heads (transformers repeats k and
    v when it passes a mask, and passes enable_gqa instead without one); math otherwise (fp32 grouped-query)."""
    hd, gqa = L.m.head_dim, L.m.num_heads != L.m.num_kv_heads and not windowed
    if not windowed and L.autocast and hd <= 256 and hd % 8 == 0:
        return "flash"
    if not gqa and hd % 8 == 0:
        return "efficient"
    return "math"


def _math_attention(P: Program, L: Layout, q: Sym, k: Sym, v: Sym, rep: int) -> Sym:
    """torch's math SDPA (_scaled_dot_product_attention_math), as `trace` records it: q * sqrt(scale), the causal
    bias from a bool tril, k and v repeated (enable_gqa), k * sqrt(scale), q @ k^T, + bias, _safe_softmax (keeps
    its output), @ v; its locals go as it returns, then transformers' transpose(1, 2).contiguous() copies."""
    m, b, seq = L.m, L.s.batch, L.s.seq
    if L.autocast:  # SDPA is on autocast's lower-precision list
        q, k, v = (cast(P, t, L.c) for t in (q, k, v))
    qs = scale(P, q)
    ones = P.new(seq * seq, 1)
    tril = P.new(seq * seq, 1)
    del ones
    bias = P.new(seq * seq, q.eb)
    del tril
    kr = elementwise(P, k, out_elems=k.elems * rep) if rep > 1 else k
    vr = elementwise(P, v, out_elems=v.elems * rep) if rep > 1 else v
    ks = scale(P, kr)
    phi3 = m.model_type == "phi3"
    qf, kf = _folded(P, qs, b, phi3), _folded(P, ks, b, phi3 or rep > 1)
    del ks
    sc = matmul(P, qf, kf, 1, b * m.num_heads * seq * seq, q.eb)
    del qf, kf
    msk = add(P, sc, bias)
    del sc
    pr = keeps_output(P, msk, q.eb)  # _safe_softmax
    del msk
    vf = _folded(P, vr, b, rep > 1)
    out = matmul(P, pr, vf, 1, q.elems, q.eb)
    del pr, vf, qs, bias, kr, vr
    o = clone(P, out)
    del out
    return o


def _folded(P: Program, x: Sym, batch: int, contiguous: bool) -> Sym:
    """x.reshape(b * heads, s, d) inside torch.matmul: a view for one sequence or a contiguous x, else a copy."""
    return x if batch == 1 or contiguous else clone(P, x)


def mlp(P: Program, L: Layout, x: Sym, W: dict) -> Sym:
    """down(act(gate(x)) * up(x)) (SwiGLU; Phi-3 fuses gate and up; MoE layers: `moe_experts`)."""
    m = L.m
    if m.is_moe:
        return moe_experts(P, L, x, W)
    h, i = m.hidden_size, m.intermediate_size
    if m.model_type == "phi3":  # one fused gate_up output; chunk(2) gives two views of it
        gu = linear(P, L, x, W, "gate_up_proj", h, 2 * i)
        g, u = view(P, gu, L.T * i), view(P, gu, L.T * i)
        del gu
    else:
        g = linear(P, L, x, W, "gate_proj", h, i)
        u = None
    act = elementwise(P, g, keep_input=True)  # silu / gelu keep their input
    del g
    if u is None:
        u = linear(P, L, x, W, "up_proj", h, i)
    p = mul(P, act, u)
    del act, u
    return linear(P, L, p, W, "down_proj", i, h)


def moe_experts(P: Program, L: Layout, x: Sym, W: dict) -> Sym:
    """A sparse MoE block as transformers 5.x runs it (MixtralSparseMoeBlock; integrations/moe.py
    `grouped_mm_experts_forward`), over S = tokens x k token-expert pairs:
    router softmax / top-k (fp32 weights) -> gather the S rows -> grouped_mm with the stacked gate_up experts ->
    act(gate) * up -> grouped_mm with down -> x routing weight (fp32 result) -> restore the order -> sum the k
    rows of each token -> cast back.

    peft targets the stacked experts as parameters (lora.ParamWrapper, one per parameter, nested: down_proj's
    outside gate_up_proj's). Each forward `_activate_lora` casts the two LoRA factors to the weight's dtype,
    `register_parametrization` evaluates the parametrization once to check it (a throwaway W'), and under
    `parametrize.cached()` the experts then use W' = baddbmm(W, lhs, rhs): a new tensor the size of the whole
    expert stack, which grouped_mm saves for backward (84 GiB over Mixtral's 32 layers without checkpointing).
    Its backward computes grouped_mm's weight gradient at full size, then the factors' gradients from it."""
    m = L.m
    h, i, k, T = m.hidden_size, m.intermediate_size, m.experts_per_token, L.T
    S = T * k
    weights = elementwise(P, x, out_elems=S, eb=4)  # router: F.linear, softmax(float), top-k, renormalized
    stacks = {}  # name -> (lhs, rhs) of each peft ParamWrapper, activated outermost first
    for name in ("experts.down_proj", "experts.gate_up_proj"):
        if name in L.targets:
            w = W[name]
            lhs, rhs = cast(P, W[name + ".lora_A"], w.eb), cast(P, W[name + ".lora_B"], w.eb)
            throwaway = P.new(w.elems, w.eb)  # register_parametrization's check evaluates the proxy once
            del throwaway
            stacks[name] = (lhs, rhs)

    def expert_weight(name: str) -> Sym:
        w = W[name]
        if name not in stacks:
            return w
        lhs, rhs = stacks[name]
        out = P.new(w.elems, w.eb)  # baddbmm(W, lhs, rhs): W is frozen, the factors get gradients

        def backward(P, g, s, le=lhs.elems, re=rhs.elems, eb=w.eb):
            return P.new(le, eb), P.new(re, eb)

        return op(P, out, (lhs, rhs), (lhs, rhs), backward)

    def grouped_linear(inp: Sym, name: str, o: int) -> tuple[Sym, Sym]:
        w = expert_weight(name)
        xc = cast(P, inp, w.eb)  # grouped_mm is not autocast-enabled: the input is cast to the weight's dtype
        return w, matmul(P, xc, w, S, o, w.eb)

    idx = P.new(S, 8)  # perm // k (int64)
    xg = op(P, P.new(S * h, x.eb), (x,), (idx,), lambda P, g, s, n=x.elems, e=x.eb: (P.new(n, e),))  # x[perm // k]
    del idx
    wg = elementwise(P, weights, eb=4)  # sample_weights[perm]
    wgu, gu = grouped_linear(xg, "experts.gate_up_proj", 2 * i)  # (xg is a local until the function returns)
    g, u = view(P, gu, S * i), view(P, gu, S * i)
    del gu
    act = elementwise(P, g, keep_input=True)
    del g
    p = mul(P, act, u)
    del act, u
    wdown, d = grouped_linear(p, "experts.down_proj", h)
    del p
    y = mul(P, d, wg, eb=4)  # proj_out * sample_weights_g: fp32
    del d, wg
    inv = P.new(S, 8)
    y2 = op(P, P.new(S * h, 4), (y,), (inv,), lambda P, g, s, n=S * h: (P.new(n, 4),))  # weighted_out[inv_perm]
    del inv
    del y
    # view(T, k, h).sum(1): its backward expands the gradient (a view, no storage)
    y3 = op(P, P.new(T * h, 4), (y2,), (), lambda P, g, s, n=S * h: (View(g, n),))
    del y2
    out = cast(P, y3, x.eb)
    del y3, wgu, wdown, xg
    stacks.clear()  # parametrize's cache and the proxies go when the wrappers' contexts exit
    return out


def decoder_layer(P: Program, L: Layout, x: Sym, W: dict, windowed: bool = False) -> Sym:
    m = L.m
    h, qd, kvd = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    hn = rmsnorm(P, L, x, W["input_layernorm"])
    if m.model_type == "phi3":
        qkv = linear(P, L, hn, W, "qkv_proj", h, qd + 2 * kvd)
        q, k, v = (view(P, qkv, L.T * n) for n in (qd, kvd, kvd))  # slices of one output
        del qkv
    else:
        q = linear(P, L, hn, W, "q_proj", h, qd)
        k = linear(P, L, hn, W, "k_proj", h, kvd)
        v = linear(P, L, hn, W, "v_proj", h, kvd)
    phi3 = m.model_type == "phi3"
    q, k = rope(P, q, phi3), rope(P, k, phi3)
    a, probs = attention(P, L, q, k, v, windowed)
    o = linear(P, L, a, W, "o_proj", qd, h)
    # The attention module's locals (q, k, v, its output) go when it returns, after o_proj; then the layer's normed
    # input, which `hidden_states, _ = self.self_attn(...)` rebinds, while `_` (eager's attention weights) lives
    # until the layer returns
    del a, q, k, v, hn
    if m.model_type == "gemma2":
        o = rmsnorm(P, L, o, W["post_attention_layernorm"])
    x = add(P, x, o)
    del o
    hn = rmsnorm(P, L, x, W["pre_feedforward_layernorm" if m.model_type == "gemma2" else "post_attention_layernorm"])
    y = mlp(P, L, hn, W)
    del hn
    if m.model_type == "gemma2":
        y = rmsnorm(P, L, y, W["post_feedforward_layernorm"])
    out = add(P, x, y)
    del probs
    return out


# ---- the model, the step, the run ------------------------------------------------------------------------------
class Param(Sym):
    """A parameter (trainable or not); trainable ones collect .grad. `producers`: ops recorded since the last
    backward that will deliver a gradient to it; `pending`: their sum so far (AccumulateGrad's input buffer)."""

    __slots__ = ("producers", "pending", "shape", "order")

    def __init__(self, prog: Program, key: int, elems: int, eb: int):
        super().__init__(prog, key, elems, eb)
        self.producers = 0
        self.pending = None
        self.shape = None  # (rows, cols) of a matrix (Adafactor factors its second moment over them)
        self.order = ()  # its place in model.parameters(), the order optimizers create their states in


def _param(P: Program, elems: int, eb: int, trainable: bool, tag: str = DENSE, shape=None, order: tuple = ()) -> Param:
    k = P.n
    P.n += 1
    P.events.append(("alloc", k, elems * eb, tag))
    p = Param(P, k, elems, eb)
    p.leaf, p.shape, p.order = trainable, shape, order
    if trainable:
        P.trainable.append(p)
    return p


def _load_dtype(L: Layout) -> int:
    """The dtype the runner draws weights in: the compute dtype (bf16 for fp32 compute's 4-bit source)."""
    return 4 if L.s.compute_dtype == "fp32" else L.c


def _quantize(P: Program, L: Layout, n: int, o: int) -> list:
    """qlora_bench.run.materialize._quantize_linear: a 16-bit weight drawn on the device, quantize_4bit (packed +
    fp32 absmax; double quantization quantizes absmax again and frees the fp32 one), the 16-bit weight freed."""
    s = L.s
    w16 = P.new(n * o, 2, LOAD)
    q = quantized_tensor_bytes(n * o, s.blocksize, s.double_quant)
    packed = _param(P, -(-(n * o) // 2), 1, False, W4)
    absmax = P.new(-(-(n * o) // s.blocksize), 4, QUANT)
    keep = [packed]
    if s.double_quant:  # uint8 absmax, nested fp32 absmax, codes, offset (quantization.py)
        keep.append(P.new(q.constants, 1, QUANT))
        del absmax
    else:
        keep.append(absmax)
        keep.append(P.new(q.constants - 4 * -(-(n * o) // s.blocksize), 1, QUANT))  # the 4-bit code table
    del w16
    return keep


def load(P: Program, L: Layout) -> tuple[dict, list, Param]:
    """The runner's build (materialize.build_model: module by module), peft's kbit preparation and adapters.
    Returns per-layer weights, the keep-alive list, and the embedding/lm_head/final-norm weights."""
    m, s = L.m, L.s
    h, V = m.hidden_size, m.vocab_size
    ld = _load_dtype(L)
    full = L.full
    embed = _param(P, V * h, ld, full, shape=(V, h), order=(0,))
    layers = []
    for i in range(m.num_layers):
        W = {}
        for j, mod in enumerate(L.modules):
            n, o = mod.in_features, mod.out_features * mod.count
            if L.qlora and mod.is_linear:
                W[mod.name] = None
                W[mod.name + ".4bit"] = _quantize(P, L, n, o)
            else:
                W[mod.name] = _param(P, n * o, ld, full, shape=(o, n), order=(1 + i, j))
            if mod.bias:  # kept by the module; the symbolic forward adds no bias (a vector per token is small)
                W[mod.name + ".bias"] = _param(P, o, ld, full, order=(1 + i, j, 2))
        for k, name in enumerate(_norm_names(m)):
            W[name] = _param(P, h, ld, full, order=(1 + i, len(L.modules) + k))
        layers.append(W)
    final_norm = _param(P, h, ld, full, order=(m.num_layers + 1,))
    head = embed if m.tie_word_embeddings else _param(P, V * h, ld, full, shape=(V, h), order=(m.num_layers + 2,))
    if L.qlora and s.upcast_non_quantized:  # prepare_model_for_kbit_training
        if L.dense == 4 and ld != 4:  # param.data = param.data.to(torch.float32), parameter by parameter
            embed = _upcast(P, embed)
            for W in layers:
                for name in list(W):
                    if isinstance(W[name], Param):
                        W[name] = _upcast(P, W[name])
            final_norm = _upcast(P, final_norm)
            head = embed if m.tie_word_embeddings else _upcast(P, head)
        P.events.append(("empty_cache",))  # peft (auto_clear_cache): "Release CUDA allocator cache after bulk casts"
    if s.uses_adapters:  # peft: lora_A [r, in], lora_B [out, r] per targeted module, fp32, in module order
        for i, W in enumerate(layers):
            for j, mod in enumerate(L.modules):
                if mod.name in L.targets:
                    r = s.rank * (2 if mod.name.endswith("gate_up_proj") and mod.group == "expert" else 1)
                    r *= mod.count
                    a = _param(P, r * mod.in_features, 4, True, ADAPTERS, (r, mod.in_features), (1 + i, j, 0))
                    b = _param(P, mod.out_features * r, 4, True, ADAPTERS, (mod.out_features, r), (1 + i, j, 1))
                    W[mod.name + ".lora_A"], W[mod.name + ".lora_B"] = a, b
    return {"layers": layers, "embed": embed, "head": head, "norm": final_norm}


def _upcast(P: Program, p: Param) -> Param:
    """The fp32 copy; the 16-bit original goes when the caller rebinds (peft: `param.data = ...`)."""
    if p.leaf:
        P.trainable.remove(p)
    return _param(P, p.elems, 4, p.leaf, shape=p.shape, order=p.order)


def _norm_names(m: ModelSpec) -> list[str]:
    if m.model_type == "gemma2":
        return [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ]
    return ["input_layernorm", "post_attention_layernorm"]


def forward_loss(P: Program, L: Layout, M: dict, workspace: int) -> Sym:
    """model(input_ids=x, labels=x).loss under autocast; the output's 16-bit logits go with the output object."""
    m, T, c = L.m, L.T, L.c
    h, V = m.hidden_size, m.vocab_size
    s = L.s
    P.autocast_cache = [] if L.autocast else None
    if workspace and P.workspace is None:  # cuBLAS takes its workspace from the caching allocator on first use
        P.workspace = P.new(workspace, 1, WORK)
    emb = M["embed"]
    P.tag = ACT  # what the forward allocates and is still alive at a backward peak: kept for backward
    x = P.new(T * h, emb.eb)  # embedding lookup
    x = op(P, x, (emb,), (), lambda P, g, s, n=emb.elems, e=emb.eb: (P.new(n, e, _grad_tag(emb)),))
    if s.uses_adapters and s.gradient_checkpointing:
        x.leaf = True  # peft's enable_input_require_grads: the embedding output requires grad
    if m.model_type == "gemma2":
        x = scale(P, x)  # hidden_states * normalizer (sqrt(hidden_size), a 0-d tensor)
    # what every layer takes besides the hidden states, kept (as checkpointed layers' inputs) through backward:
    # the mask (eager: an additive one in the embedding's dtype; sliding-window sdpa: bool) and rotary cos / sin
    b, S = s.batch, s.seq
    P.shared = [P.new(T * m.head_dim, x.eb) for _ in range(2)]
    if s.attn == "eager" or L.windowed:
        P.shared.append(P.new(b * S * S, x.eb if s.attn == "eager" else 1))
    if s.attn == "eager" and m.model_type == "gemma2":  # Gemma-2 builds a full and a sliding-window mask, always
        P.shared.append(P.new(b * S * S, x.eb))
    for i, W in enumerate(M["layers"]):
        win = i in L.windowed
        if s.gradient_checkpointing:
            x = checkpoint(P, lambda t, W=W, win=win: decoder_layer(P, L, t, W, win), x)
        else:
            x = decoder_layer(P, L, x, W, win)
    if not s.gradient_checkpointing:
        P.shared = P.shared[:2]  # the mask: nothing keeps it once the layers ran (rope's nodes keep cos / sin)
    P.tag = LOSS  # the final norm, the logits and the cross-entropy, forward and backward
    hn = rmsnorm(P, L, x, M["norm"])
    del x
    head = M["head"]
    hc = cast(P, hn, c) if L.autocast else hn
    del hn
    logits = matmul(P, hc, autocast_weight(P, head, c) if L.autocast else head, T, V, c if L.autocast else head.eb)
    del hc
    if m.final_logit_softcapping:  # logits = logits / cap; logits = tanh(logits); logits = logits * cap
        logits = scale(P, logits)
        logits = tanh(P, logits)
        logits = scale(P, logits)
    # ForCausalLMLoss: logits.float(); cross_entropy = log_softmax (keeps its output) + nll_loss
    f = cast(P, logits, 4)
    lp = softmax(P, f)
    loss = P.new(1, 4)
    loss = op(P, loss, (lp,), (), lambda P, g, s, n=lp.elems: (P.new(n, 4),))
    del lp
    P.autocast_cache = None  # autocast region ends: cached casts go (those saved for backward stay)
    # The model output is dropped once .loss is taken: its 16-bit logits go, then the loss function's fp32 copy,
    # which (as `trace` shows) lives until then too
    del logits, f
    P.tag = TEMP
    return loss


def optimizer_step(P: Program, L: Layout, params: list, state: list, first: bool) -> None:
    """optimizer.step(): states on the first step (torch AdamW: exp_avg, exp_avg_sq like the parameter;
    bitsandbytes 8-bit: uint8 states + fp32 absmax per 256, paged ones outside this allocator); the foreach
    AdamW's temporary list (sqrt of exp_avg_sq) for the step."""
    kind = L.s.optimizer_kind
    if first:
        for p in params:
            n = p.elems
            if kind in ("adamw_torch", "adamw_torch_fused"):
                state += [P.new(n, p.eb, OPT), P.new(n, p.eb, OPT)]
                if kind == "adamw_torch_fused":
                    state.append(P.new(1, 4, OPT))
            elif kind in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
                paged = kind.startswith("paged") and n >= PAGED_MIN_NUMEL
                eight = kind.endswith("8bit") and n >= MIN_8BIT_SIZE
                if not paged:
                    state += [P.new(n, 1 if eight else 4, OPT), P.new(n, 1 if eight else 4, OPT)]
                if eight:
                    blocks = -(-n // BNB_8BIT_BLOCKSIZE)
                    state += [P.new(blocks, 4, OPT), P.new(blocks, 4, OPT)]
            elif kind == "adafactor":  # optimizer.py: rows + columns for a matrix, the full vector otherwise
                state.append(P.new(sum(p.shape) if p.shape else n, p.eb, OPT))
    if kind == "adamw_torch":
        tmp = [P.new(p.elems, p.eb, OPT_TEMP) for p in params]
        del tmp


def program(model: ModelSpec, s: Settings, workspace: int = 0, steps: int = 2) -> list[tuple]:
    """The allocation events of load + `steps` optimizer steps of the runner's loop (2: the second step starts
    from the first one's cached blocks and optimizer states, which is where peaks settle)."""
    L = Layout(model, s)
    P = Program()
    P.phase("load")
    M = load(P, L)
    ids = P.new(L.T, 8, INPUT)  # int64 token ids
    P.events.append(("reset_peaks",))  # the runner measures training only (run/train.py)
    trainable = None
    state: list = []
    for step in range(steps):
        # micro-batches after the second repeat its allocations exactly (gradients accumulate in place): the peaks
        # of 3 and of 8 micro-batches are the same bytes (tests/test_program.py), so at most 3 are simulated
        for _ in range(min(s.grad_accum, MICRO_BATCHES_SIMULATED)):
            P.phase(f"forward {step}")
            loss = forward_loss(P, L, M, workspace)
            P.phase(f"backward {step}")
            g = P.new(1, 4)  # ones_like(loss)
            run_backward(P, loss, g)
            del loss, g
            P.shared = []
        if trainable is None:  # torch's optimizers create states in model.parameters() order, for those with .grad
            has_grad = {id(p) for p in P.grads}
            trainable = sorted((p for p in P.trainable if id(p) in has_grad), key=lambda p: p.order)
        P.phase(f"optimizer {step}")
        optimizer_step(P, L, trainable, state, first=step == 0)
        P.phase(f"zero_grad {step}")
        for p in P.grads:
            p.grad = None
        P.grads = []
    P.phase("end")
    events = P.events
    # the run's end frees weights and states, said explicitly (the Program's own lists would hold them in a cycle
    # with the tensors' reference back to it)
    P.trainable, P.workspace, P.shared, P.grads = [], None, [], []
    del M, ids, state, trainable, P
    return events
