"""4-bit weight storage exactly as bitsandbytes allocates it (`bitsandbytes.functional.quantize_4bit`).

Per quantized tensor of n elements with blocksize B (bitsandbytes 0.50):
- packed data: two 4-bit values per uint8 -> ceil(n / 2) bytes;
- `code` (the 16-entry NF4/FP4 level table, `get_4bit_type`): 16 fp32 = 64 bytes, one per tensor;
- without double quantization: `absmax`, one fp32 per block -> 4 * ceil(n / B) bytes (0.5 bit/param at B=64);
- with double quantization (`compress_statistics=True`): absmax - mean(absmax) is quantized again with
  `quantize_blockwise(blocksize=256)`: one uint8 per block, one fp32 per 256 blocks (`state2.absmax`), the
  256-entry fp32 dynamic code `state2.code` (1 KiB) and the fp32 `offset` -> ~0.127 bit/param (QLoRA paper
  section 3: 8/64 + 32/(64*256)).
Verified against the tensors bitsandbytes returns in tests/test_quantization_bytes.py.
"""

from __future__ import annotations

from dataclasses import dataclass

NESTED_BLOCKSIZE = 256  # quantize_blockwise(absmax, blocksize=256) in quantize_4bit
CODE_4BIT_BYTES = 16 * 4  # get_4bit_type(): 16 fp32 levels, allocated per quantized tensor
NESTED_CODE_BYTES = 256 * 4  # create_dynamic_map(): 256 fp32 entries, per tensor (state2.code)
OFFSET_BYTES = 4  # absmax.mean(): a 0-d fp32 tensor


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class QuantBytes:
    packed: int
    constants: int

    @property
    def total(self) -> int:
        return self.packed + self.constants


def quantized_tensor_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> QuantBytes:
    """Bytes bitsandbytes allocates for one 4-bit weight of `numel` elements."""
    packed = _ceil_div(numel, 2)
    blocks = _ceil_div(numel, blocksize)
    if double_quant:
        constants = blocks * 1 + 4 * _ceil_div(blocks, NESTED_BLOCKSIZE) + NESTED_CODE_BYTES + OFFSET_BYTES
    else:
        constants = blocks * 4
    return QuantBytes(packed=packed, constants=constants + CODE_4BIT_BYTES)


def bits_per_param(numel: int, blocksize: int = 64, double_quant: bool = True) -> float:
    return 8 * quantized_tensor_bytes(numel, blocksize, double_quant).total / numel
