"""Bytes per element of the dtypes the training path uses."""

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "uint8": 1}


def nbytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]
