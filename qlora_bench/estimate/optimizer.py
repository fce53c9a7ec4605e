"""Gradients and optimizer states, per trainable tensor, for the TrainingArguments `optim` names.

- adamw_torch / adamw_torch_fused (torch.optim.AdamW): exp_avg and exp_avg_sq in the parameter's dtype
  (8 B/param for fp32 adapters, 4 B/param for a bf16 model). The fused variant keeps `step` as a 0-d fp32
  tensor on the device; the foreach variant (adamw_torch's default on CUDA) allocates `_foreach_sqrt(exp_avg_sq)`,
  a temporary the size of one state, during the step (torch/optim/adamw.py, _multi_tensor_adamw).
- adamw_8bit / paged_adamw_8bit (bitsandbytes AdamW8bit / PagedAdamW8bit, optim_bits=8): for tensors with
  numel >= min_8bit_size (4096) uint8 state1/state2 plus fp32 absmax1/absmax2 per 256 elements; smaller tensors
  keep fp32 state1/state2 (bitsandbytes/optim/optimizer.py, Optimizer8bit.init_state). The qmaps are shared.
- paged_adamw_32bit (PagedAdamW): fp32 state1/state2.
- Paged optimizers: `get_state_buffer` allocates state1/state2 of tensors with numel >= 1e5 with
  cudaMallocManaged (F.get_paged): invisible to torch's allocator counters, visible to NVML, evictable to host.
  absmax buffers are ordinary device tensors.
- adafactor (transformers Adafactor as the Trainer builds it: no first moment): factored second moment for
  >= 2-D tensors (row + column vectors over the last two dims), a full one for 1-D tensors; in the grad dtype.
- sgd (torch.optim.SGD, momentum 0 as the Trainer builds it): no state.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer8bit default min_8bit_size
PAGED_MIN_NUMEL = 100_000  # bitsandbytes Optimizer8bit.get_state_buffer: `p.numel() < 1e5` is not paged
BNB_8BIT_BLOCKSIZE = 256  # blockwise 8-bit optimizer states: one fp32 absmax per 256 elements
FUSED_STEP_BYTES = 4  # torch AdamW(fused=True): state['step'] is a 0-d fp32 device tensor


@dataclass(frozen=True)
class Trainable:
    """A group of identical trainable tensors: `count` tensors of `numel` elements each, in `dtype_bytes`."""

    numel: int
    count: int
    dtype_bytes: int
    shape2d: tuple[int, int] | None = None  # (rows, cols) of the last two dims, for Adafactor; None for 1-D
    lead: int = 1  # product of leading dims beyond the last two (fused MoE experts)


@dataclass(frozen=True)
class OptimizerBytes:
    device: int  # ordinary device tensors (seen by torch.cuda.memory_allocated)
    paged: int  # cudaMallocManaged buffers (seen by NVML only)
    step_transient: int  # temporaries during optimizer.step()


def gradient_bytes(tensors: list[Trainable]) -> int:
    """Gradients have the parameter's dtype (autograd accumulates into param.grad of the same dtype)."""
    return sum(t.numel * t.count * t.dtype_bytes for t in tensors)


def optimizer_bytes(tensors: list[Trainable], optimizer: str) -> OptimizerBytes:
    device = paged = transient = 0
    for t in tensors:
        n, c = t.numel, t.count
        if optimizer in ("adamw_torch", "adamw_torch_fused"):
            device += c * (2 * n * t.dtype_bytes)
            if optimizer == "adamw_torch_fused":
                device += c * FUSED_STEP_BYTES
            else:
                transient += c * n * t.dtype_bytes
        elif optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
            is_paged = optimizer.startswith("paged") and n >= PAGED_MIN_NUMEL
            if optimizer.endswith("8bit") and n >= MIN_8BIT_SIZE:
                states = 2 * n * 1
                device += c * 2 * 4 * (-(-n // BNB_8BIT_BLOCKSIZE))
            else:
                states = 2 * n * 4
            if is_paged:
                paged += c * states
            else:
                device += c * states
        elif optimizer == "adafactor":
            if t.shape2d is None:
                device += c * n * t.dtype_bytes
            else:
                rows, cols = t.shape2d
                device += c * t.lead * (rows + cols) * t.dtype_bytes
        elif optimizer == "sgd":
            pass
        else:  # pragma: no cover - Settings.validated() rejects unknown names
            raise ValueError(optimizer)
    return OptimizerBytes(device=device, paged=paged, step_transient=transient)
