"""The allocation recorder: a TorchDispatchMode that sees every op of the traced program and writes, in program
order, one event per new device storage and one per freed storage.

An op output whose untyped_storage() has not been seen is a new allocation (views and in-place results share a
storage seen before); a weakref on the storage object records its free: torch keeps a storage's Python object alive
as long as its C++ StorageImpl lives, so the callback fires exactly when the memory would go back to the caching
allocator. Storages are keyed by a sequence number, not id(), so that two traces give identical events.

Events (the format of qlora_bench.estimate.allocator.replay):
    ("alloc", key, nbytes, tag)   ("free", key)   ("phase", name)   ("empty_cache",)
Tags are decided when the trace ends, from what each storage turned out to be:
- parameters / quant_state / inputs: alive when loading ends and held by the model (parameters and buffers), by a
  4-bit weight's quantization state, or the input ids (the worker classifies them);
- load: made while loading and gone by its end (16-bit weights before quantization, the originals of the fp32
  upcast), or kept by nothing above;
- gradients: a parameter's .grad when the optimizer step starts; optimizer_states: in optimizer.state after it;
- activations: made in a forward and still alive when the forward returns (what autograd saved, the loss), and
  everything gradient checkpointing recomputes inside backward (grad mode on in the autograd engine). The
  recompute's short-lived intermediates are counted here too: a simpler rule than following each saved tensor,
  and at most one op's intermediates are alive at any moment;
- temporaries: everything else made during a step (freed within its phase, or kept by the step's own code);
- workspaces: the cuBLAS workspace and flash attention's backward scratch, which no op returns (synthetic).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# phase kinds, stored per storage (a small int: a list of ints is cheaper than a list of strings)
LOAD, FWD, BWD, OPT, ZERO = range(5)
KIND = {"load": LOAD, "fwd": FWD, "bwd": BWD, "opt": OPT, "zero": ZERO}

# ops that run a cuBLAS GEMM: the first one on a stream allocates the cuBLAS workspace through the caching allocator
# (aten/src/ATen/cuda/CublasHandlePool.cpp, getCurrentCUDABlasHandle -> getCUDABlasLtWorkspace / cublasSetWorkspace)
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation", "_scaled_mm", "addmv", "mv"}

_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_backward.default
_graph_task_id = torch._C._current_graph_task_id


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def flash_backward_scratch(query, key) -> list[int]:
    """Bytes the flash-attention backward allocates besides its outputs and frees before returning, from
    aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp (mha_bwd, torch 2.4-2.13): softmax_d
    (fp32 [b, h, s_q rounded to 128]), dq_accum (fp32 [b, s_q rounded, h, head dim rounded to 32 (64 above 128)],
    `loop` is always true), and for grouped-query attention dk_expanded / dv_expanded ([b, s_k, h, d] in the input
    dtype) that are summed into dk / dv. The query here is in SDPA's [b, h, s, d] layout."""
    b, h, sq, d = query.shape
    hk, sk = key.shape[1], key.shape[2]
    d_r = _round_up(d, 32 if d <= 128 else 64)
    sq_r = _round_up(sq, 128)
    out = [b * h * sq_r * 4, b * sq_r * h * d_r * 4]
    if hk != h:
        out += [b * sk * h * d * query.element_size()] * 2
    return out


class Recorder(TorchDispatchMode):
    """Records allocations of device `device_type` storages. Use inside a FakeTensorMode (entered after it, so it
    sees each op first and hands it down)."""

    def __init__(self, workspace_bytes: int = 0, flash_scratch: bool = True, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.events: list[tuple] = []
        self.ops: dict[int, str] = {}  # key -> op that allocated it
        self.n_ops = 0
        self._key_of: dict[int, int] = {}  # id(storage object) -> key, for live storages
        self._refs: dict[int, weakref.ref] = {}  # key -> weakref (kept so that its callback fires)
        self.live: dict[int, int] = {}  # key -> nbytes, storages in the caching allocator
        self.nbytes: list[int] = []  # per key
        self.kind: list[int] = []  # per key: phase kind at allocation
        self.recompute: set[int] = set()  # keys allocated in backward with grad mode on (checkpoint recompute)
        self.tag: dict[int, str] = {}  # keys classified by what they are (parameters, gradients, ...)
        self.phase_kind = LOAD
        self.phase_name = "load"
        self.workspace_bytes = workspace_bytes
        self.workspace_done = workspace_bytes <= 0
        self.flash_scratch = flash_scratch
        self.flash_scratch_bytes = 0
        self.paged: dict[int, int] = {}  # key -> nbytes, managed (paged) storages: not in the caching allocator
        self.paged_peak = 0
        self.attention: dict[str, int] = {}  # SDPA backend -> calls (filled by the SDPA patch)
        self.paused = False  # True while a patch creates a tensor that is not in the caching allocator
        # (phase name, op) -> calls of ops that are not views: the step's kernel inventory (estimate/steptime.py
        # is checked against it)
        self.op_calls: dict[tuple[str, str], int] = {}

    # ---- phases --------------------------------------------------------------------------------------------
    def phase(self, name: str, kind: str) -> None:
        self.phase_name = name
        self.phase_kind = KIND[kind]
        self.events.append(("phase", name))

    def empty_cache(self) -> None:
        self.events.append(("empty_cache",))

    # ---- storages ------------------------------------------------------------------------------------------
    def _new_key(self, nbytes: int) -> int:
        key = len(self.nbytes)
        self.nbytes.append(nbytes)
        self.kind.append(self.phase_kind)
        return key

    def _watch(self, st, key: int, table: dict) -> None:
        sid = id(st)
        self._key_of[sid] = key

        def freed(_ref, key=key, sid=sid, table=table):
            self._key_of.pop(sid, None)
            self._refs.pop(key, None)
            if table.pop(key, None) is not None and table is self.live:
                self.events.append(("free", key))

        self._refs[key] = weakref.ref(st, freed)

    def track(self, t, op: str) -> None:
        """Record `t`'s storage if it is a device storage not seen before."""
        if self.paused or t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        if id(st) in self._key_of:
            return
        n = st.nbytes()
        if n == 0:  # the caching allocator hands out nullptr for 0 bytes
            return
        key = self._new_key(n)
        # inside the autograd engine with grad mode on: checkpointing's recompute of a forward (backward functions
        # run with grad mode off; the step's own code between backward and the optimizer runs outside the engine)
        if self.phase_kind == BWD and torch.is_grad_enabled() and _graph_task_id() != -1:
            self.recompute.add(key)
        self.ops[key] = op
        self.live[key] = n
        self._watch(st, key, self.live)
        self.events.append(("alloc", key, n, None))

    def track_all(self, tensors: Iterable, op: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.track(t, op)

    def paged_storage(self, t) -> None:
        """`t` lives in managed memory (cudaMallocManaged: bitsandbytes' paged optimizer state), not in torch's
        caching allocator: counted apart, never replayed."""
        st = t.untyped_storage()
        if id(st) in self._key_of:
            return
        key = self._new_key(st.nbytes())
        self.paged[key] = st.nbytes()
        self._watch(st, key, self.paged)
        self.paged_peak = max(self.paged_peak, sum(self.paged.values()))

    def adopt(self, tensors: Iterable) -> None:
        """Storages that existed before recording started: known (their views and in-place results are not new
        allocations), not recorded."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                st = t.untyped_storage()
                if id(st) not in self._key_of:
                    self._watch(st, self._new_key(st.nbytes()), {})

    def synthetic(self, nbytes: int, tag: str, op: str) -> int:
        """An allocation the fake kernels do not make but the real ones do (a workspace): returns its key."""
        key = self._new_key(nbytes)
        self.tag[key] = tag
        self.ops[key] = op
        self.live[key] = nbytes
        self.events.append(("alloc", key, nbytes, None))
        return key

    def release(self, key: int) -> None:
        if self.live.pop(key, None) is not None:
            self.events.append(("free", key))

    def classify(self, tensors: Iterable, tag: str) -> None:
        """Tag the storages of these tensors (parameters, gradients, optimizer states...), unless already tagged."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                key = self._key_of.get(id(t.untyped_storage()))
                if key is not None and key not in self.tag:
                    self.tag[key] = tag

    def end_forward(self) -> None:
        """Storages allocated in this forward and still alive when it returns are what autograd keeps for backward
        (saved tensors, and the loss)."""
        for key in self.live:
            if self.kind[key] == FWD and key not in self.tag:
                self.tag[key] = "activations"

    # ---- the hook ------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.n_ops += 1
        name = func.overloadpacket.__name__
        if not func.is_view:
            k = (self.phase_name, name)
            self.op_calls[k] = self.op_calls.get(k, 0) + 1
        if isinstance(out, torch.Tensor):
            self.track(out, name)
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self.track(t, name)
                elif isinstance(t, (tuple, list)):  # foreach ops return lists
                    self.track_all(t, name)
        if not self.workspace_done and name in _GEMM:
            self.workspace_done = True
            self.synthetic(self.workspace_bytes, "workspaces", "cublas_workspace")
        if func is _FLASH_BWD and self.flash_scratch:
            scratch = flash_backward_scratch(args[1], args[2])
            self.flash_scratch_bytes = max(self.flash_scratch_bytes, sum(scratch))
            for k in [self.synthetic(n, "workspaces", "flash_attention_backward") for n in scratch]:
                self.release(k)
        return out

    # ---- the result ----------------------------------------------------------------------------------------
    def tag_of(self, key: int) -> str:
        tag = self.tag.get(key)
        if tag is not None:
            return tag
        kind = self.kind[key]
        if kind == LOAD:
            return "load"  # created while loading and not a parameter, buffer, quant state or input
        if kind == BWD and key in self.recompute:
            return "activations"  # recomputed by gradient checkpointing, kept for the layer's backward
        return "temporaries"

    def finish(self) -> list[tuple]:
        """The events with their tags. A run of frees with nothing between them is put in key order: some are freed
        in an order that depends on addresses (autocast's cache of casts is a hash map keyed by pointer, cleared
        when autocast exits), and the allocator ends in the same state whatever the order of frees that no
        allocation separates (merging free neighbours is order-free), so sorted runs make the events repeatable
        without changing what they replay to."""
        out: list[tuple] = []
        run: list[tuple] = []
        for e in self.events:
            if e[0] == "free":
                run.append(e)
                continue
            if run:
                out += sorted(run)
                run = []
            out.append(("alloc", e[1], e[2], self.tag_of(e[1])) if e[0] == "alloc" else e)
        return out + sorted(run)
