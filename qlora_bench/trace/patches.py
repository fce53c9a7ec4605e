"""What a real GPU run does that fake CUDA tensors on a CPU-only torch cannot do by themselves: version-tied patches.

Each patch changes the narrowest point that fails (or decides differently) on fake CUDA, names the library version
it was written against and why it is needed, and leaves the runner's own logic alone. `apply()` installs them in
the trace worker (a throwaway process); nothing here runs in the calling process.
"""

from __future__ import annotations

import types
import weakref

import torch

from .tracer import Recorder

# ---- torch ---------------------------------------------------------------------------------------------------


def autocast_on_fake_cuda() -> None:
    """torch 2.4-2.13, torch/amp/autocast_mode.py: autocast("cuda") disables itself when
    torch.cuda.amp.common.amp_definitely_not_available() (no CUDA device) and refuses bf16 unless
    torch.cuda.is_bf16_supported(). The AutocastCUDA kernels are registered in libtorch_cpu, so autocast works on
    fake CUDA tensors once these two answer as on an sm80+ GPU."""
    import torch.cuda.amp.common as amp_common

    amp_common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *a, **k: True


# torch's own: for tensors that are not on CUDA, and for the math backend
_orig_sdpa = torch.nn.functional.scaled_dot_product_attention


def sdpa_backend(query, key, value, attn_mask, dropout_p: float, enable_gqa: bool) -> str:
    """The backend torch's CUDA SDPA picks on sm80/sm90 (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp,
    torch 2.5-2.13, default priority flash > efficient > math; cuDNN attention is not in the default order for
    training): flash for fp16/bf16 inputs without an explicit mask and a head dim <= 256 that is a multiple of 8
    (grouped-query attention natively, with enable_gqa); memory-efficient for fp16/bf16/fp32 with or without a mask
    but equal query and key heads (its GQA support is not in the checks we read: treated as unsupported); math
    otherwise."""
    hd = query.shape[-1]
    gqa = key.shape[-3] != query.shape[-3]
    half = query.dtype in (torch.float16, torch.bfloat16)
    if attn_mask is None and half and hd <= 256 and hd % 8 == 0 and value.shape[-1] == hd:
        return "flash"
    if not gqa and query.dtype in (torch.float16, torch.bfloat16, torch.float32) and hd % 8 == 0:
        return "efficient"
    return "math"


def sdpa_like_cuda(recorder: Recorder):
    """A CPU build of torch always picks the math backend for F.scaled_dot_product_attention (the CUDA choice
    lives in the CUDA library), which materialises the [b, h, s, s] scores: call the kernel the GPU would run
    (aten._scaled_dot_product_flash_attention / _efficient_attention have meta kernels and autograd formulas)."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "cuda":
            return _orig_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if torch.is_autocast_enabled("cuda"):  # SDPA is on autocast's lower-precision list: cast as autocast would
            dt = torch.get_autocast_dtype("cuda")
            with torch.autocast("cuda", enabled=False):
                return sdpa(query.to(dt), key.to(dt), value.to(dt), attn_mask, dropout_p, is_causal, scale, enable_gqa)
        backend = sdpa_backend(query, key, value, attn_mask, dropout_p, enable_gqa)
        recorder.attention[backend] = recorder.attention.get(backend, 0) + 1
        if backend == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        if backend == "efficient":
            if attn_mask is not None:
                if attn_mask.dtype == torch.bool:  # what sdp_utils' preprocessing does with a boolean mask
                    attn_mask = torch.where(attn_mask, 0.0, float("-inf")).to(query.dtype)
                attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
            )[0]
        return _orig_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    return sdpa


_KEEP: list = []  # torch.library registrations live as long as their Library object


def cuda_kernels_over_composite() -> None:
    """torch 2.13 CPU builds: aten ops that have both device kernels and a CompositeImplicitAutograd kernel
    (silu_backward, mish_backward, native_channel_shuffle: every such op in this build) have no CUDA kernel, so
    the dispatcher sends fake CUDA tensors through the composite decomposition (silu_backward -> sigmoid, mul,
    add, ...), above our recorder: temporaries a CUDA build never allocates (its CUDA kernel wins over the
    composite one). Registering a CUDA kernel restores the CUDA build's dispatch; it is never called, since
    FakeTensorMode answers at the Python key first."""
    lib = torch.library.Library("aten", "IMPL")

    def never(*args, **kwargs):
        raise RuntimeError("qlora-bench trace: a fake-CUDA placeholder kernel ran outside FakeTensorMode")

    for op in ("silu_backward", "mish_backward", "native_channel_shuffle"):
        lib.impl(op, never, "CUDA")
    _KEEP.append(lib)


def swap_tensors_past_fake_memo(fake_mode) -> None:
    """torch 2.13: Module._apply (Module.to, used by peft to place new LoRA weights) swaps fake parameters with
    torch.utils.swap_tensors, which refuses a tensor that has weak references, and FakeTensorMode memoizes every
    fake tensor it creates in a WeakValueDictionary (meta_converter.tensor_memo). Drop the two tensors' memo
    entries (a cache of meta -> fake conversions; the meta tensors behind op outputs are never converted again)
    before swapping. The memo itself stays weak: a strong one keeps every step's tensors alive."""
    memo = fake_mode.fake_tensor_converter.meta_converter.tensor_memo
    orig = torch.utils.swap_tensors

    def memo_keys(t) -> list:  # a WeakValueDictionary holds KeyedRefs that know their key
        return [r.key for r in weakref.getweakrefs(t) if isinstance(r, weakref.KeyedRef) and memo.data.get(r.key) is r]

    def swap_tensors(t1, t2):
        for key in memo_keys(t1) + memo_keys(t2):  # no weakref object may outlive this loop: swap counts them
            del memo[key]
        return orig(t1, t2)

    torch.utils.swap_tensors = swap_tensors


def device_capability_sm90() -> None:
    """torch.cuda.get_device_capability() initialises CUDA, which a CPU build refuses; transformers 5.x asks it to
    choose kernels (integrations/moe.py: grouped_mm experts need sm80+). The trace mirrors an sm90 GPU (H100), as
    the SDPA choice does."""
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)


def synchronize_nothing() -> None:
    """torch.cuda.synchronize() initialises CUDA, which a CPU build refuses; bitsandbytes 0.50's optimizers call it
    after every parameter's update (utils.sync_gpu). Fake tensors leave no device work to wait for, and a sync
    allocates nothing."""
    torch.cuda.synchronize = lambda *a, **k: None


# ---- transformers --------------------------------------------------------------------------------------------


def packed_sequences_from_inputs() -> None:
    """transformers 5.x masking_utils.find_packed_sequence_indices reads position_ids' values to detect packed
    sequences; it cannot read a fake tensor (is_tracing(fake) is True) and then assumes packing, which builds a 4-D
    mask and moves attention from flash to the efficient kernel with repeated k/v. The trace's inputs are one
    unpadded, unpacked sequence per row, for which the real function returns None: keep its ops (their small
    allocations are real, the test of the last column included), decide its answer from the inputs."""
    import transformers.masking_utils as mu

    orig = mu.find_packed_sequence_indices

    def find_packed_sequence_indices(position_ids):
        out = orig(position_ids)
        if out is None or not mu.is_tracing(out):
            return out
        (out[:, -1] == 0).all()  # what the real function computes (and reads) to decide
        return None

    mu.find_packed_sequence_indices = find_packed_sequence_indices


def flash_attention_2_as_sdpa_flash() -> None:
    """transformers 5.23 attn_implementation="flash_attention_2" needs the flash_attn package (CUDA-only wheels)
    at model init (PreTrainedModel._check_and_adjust_attn_implementation) and in every forward. Its kernels are the
    FlashAttention-2 kernels that torch's SDPA flash backend vendors (aten/src/ATen/native/transformers/cuda/
    flash_attn): the same output, logsumexp and backward scratch for unpadded, unpacked inputs. Run it as SDPA's
    flash backend (the trace's report says so)."""
    from transformers import modeling_utils as mu
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    orig = mu.PreTrainedModel._check_and_adjust_attn_implementation

    def check(self, attn_implementation, *args, **kwargs):
        if attn_implementation == "flash_attention_2":
            return attn_implementation
        return orig(self, attn_implementation, *args, **kwargs)

    mu.PreTrainedModel._check_and_adjust_attn_implementation = check
    mu.AttentionInterface._global_mapping["flash_attention_2"] = sdpa_attention_forward


# ---- peft ----------------------------------------------------------------------------------------------------


class _CudaAsOnGpu(types.SimpleNamespace):
    """torch.cuda as code sees it on a GPU machine: available; empty_cache() is recorded for the allocator model."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchAsOnGpu(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(torch, name)


def peft_empty_cache(recorder: Recorder) -> None:
    """peft 0.21 prepare_model_for_kbit_training empties the CUDA cache after the fp32 upcast when
    torch.cuda.is_available(): on the GPU this releases the cached segments of the 16-bit weights. Only that
    module sees an available CUDA whose empty_cache() goes into the trace (a global is_available() == True would
    send other code into real CUDA calls)."""
    import peft.utils.other as other

    cuda = _CudaAsOnGpu(is_available=lambda: True, empty_cache=recorder.empty_cache)
    other.torch = _TorchAsOnGpu(cuda=cuda)


# ---- bitsandbytes --------------------------------------------------------------------------------------------


def bnb_params4bit_on_fake(fake_mode) -> None:
    """bitsandbytes 0.50 Params4bit.__new__ wraps its data with Tensor._make_subclass, which refuses a FakeTensor
    (a parameter of two tensor subclasses is needed). Build the parameter as a FakeTensor of a combined class that
    shares the data's storage (so the recorder sees no new allocation: there is none on the GPU either)."""
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    Params4bit = bnb.nn.Params4bit
    orig_new = Params4bit.__new__

    class FakeParams4bit(Params4bit, FakeTensor):
        pass

    FakeParams4bit.__name__ = FakeParams4bit.__qualname__ = "Params4bit"  # peft and transformers check the name

    def new(cls, data=None, requires_grad=False, quant_state=None, blocksize=None, compress_statistics=True,
            quant_type="fp4", quant_storage=torch.uint8, module=None, bnb_quantized=False, **kwargs):  # fmt: skip
        if not isinstance(data, FakeTensor):
            return orig_new(cls, data, requires_grad, quant_state, blocksize, compress_statistics, quant_type,
                            quant_storage, module, bnb_quantized, **kwargs)  # fmt: skip
        with unset_fake_temporarily():
            elem = torch.empty(0, dtype=data.dtype, device="meta")
            elem.set_(data.untyped_storage(), data.storage_offset(), data.shape, data.stride())
        self = FakeTensor.__new__(FakeParams4bit, fake_mode, elem, data.device)
        self.requires_grad_(requires_grad)
        self.blocksize = 64 if blocksize is None else blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    Params4bit.__new__ = new


def bnb_constant_maps(fake_mode) -> None:
    """bitsandbytes 0.50 builds its 8-bit quantization maps (create_dynamic_map: blockwise double quantization,
    8-bit optimizer qmaps) with .tolist(), which a fake tensor cannot answer. Build them for real on the CPU (256
    values, no device memory) and hand out fake copies; moving them to the device is then recorded as on the GPU."""
    import bitsandbytes.functional as F
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    orig = F.create_dynamic_map

    def create_dynamic_map(*args, **kwargs):
        with unset_fake_temporarily():
            real = orig(*args, **kwargs)
        return fake_mode.from_tensor(real)

    F.create_dynamic_map = create_dynamic_map


def bnb_paged_memory(recorder: Recorder) -> None:
    """bitsandbytes 0.50 paged optimizers allocate state > 1e5 elements with cudaMallocManaged through ctypes
    (functional.get_paged), outside torch's caching allocator, and touch it with ctypes calls (fill, prefetch).
    Fake it with a device tensor that the recorder counts as managed memory (NVML sees it once the state is on the
    GPU), never replayed through the allocator model."""
    import bitsandbytes.functional as F

    def get_paged(*shape, dtype=torch.float32, device=None):
        recorder.paused = True
        try:
            t = torch.empty(shape, dtype=dtype, device=device if device is not None else "cuda")
        finally:
            recorder.paused = False
        recorder.paged_storage(t)
        t.is_paged = True
        t.page_deviceid = 0
        return t

    F.get_paged = get_paged
    F.prefetch_tensor = lambda *a, **k: None
    F.fill = lambda *a, **k: None


def apply(recorder: Recorder, fake_mode, uses_bnb: bool, attn: str) -> None:
    autocast_on_fake_cuda()
    torch.nn.functional.scaled_dot_product_attention = sdpa_like_cuda(recorder)
    cuda_kernels_over_composite()
    synchronize_nothing()
    device_capability_sm90()
    swap_tensors_past_fake_memo(fake_mode)
    packed_sequences_from_inputs()
    if attn == "flash_attention_2":
        flash_attention_2_as_sdpa_flash()
    peft_empty_cache(recorder)
    if uses_bnb:
        bnb_params4bit_on_fake(fake_mode)
        bnb_constant_maps(fake_mode)
        bnb_paged_memory(recorder)
