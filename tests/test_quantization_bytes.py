"""4-bit storage: our byte formula against the tensors bitsandbytes really allocates (on CPU)."""

import pytest

from qlora_bench.estimate.quantization import bits_per_param, quantized_tensor_bytes

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")


def _allocated(shape, blocksize, dq):
    w = torch.randn(*shape, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    return nbytes(packed), sum(nbytes(t) for t in tensors)


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 512), (100, 33), (896, 128), (7, 5)])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_bytes_equal_bitsandbytes(shape, dq, blocksize):
    packed, constants = _allocated(shape, blocksize, dq)
    q = quantized_tensor_bytes(shape[0] * shape[1], blocksize, dq)
    assert (q.packed, q.constants) == (packed, constants)


def test_bits_per_param_match_qlora_paper():
    n = 4096 * 4096
    # no double quant: 4 bits + one fp32 absmax per 64 values = 4.5 bits (+ the 64-byte code table)
    assert bits_per_param(n, 64, False) == pytest.approx(4.5, abs=1e-4)
    # double quant: 4 + 8/64 + 32/(64*256) = 4.127 bits; saving ~0.373 bit/param (QLoRA paper, section 3)
    assert bits_per_param(n, 64, True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert bits_per_param(n, 64, False) - bits_per_param(n, 64, True) == pytest.approx(0.373, abs=1e-3)
