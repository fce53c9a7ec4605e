"""Byte units. GPU memory is marketed in binary units ("80 GB" boards report ~80 GiB), so we print GiB."""

from __future__ import annotations

GiB = 1024**3
MiB = 1024**2


def gib(n_bytes: float) -> float:
    return n_bytes / GiB


def fmt_gib(n_bytes: float, digits: int = 2) -> str:
    return f"{n_bytes / GiB:.{digits}f} GiB"
