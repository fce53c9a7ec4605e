"""Command-line values as people type them: `--seq 8k`, `--epoch-tokens 100M`, `--method QLoRA`.

Each parser takes the text of one flag and returns the value, or raises argparse.ArgumentTypeError with what
would be right (argparse turns it into `qlora-bench: error: argument --seq: ...`, exit 2). The bounds come from
the schema of the thing the flag sets (Settings), so a flag and a sweep file refuse the same values.

Suffixes: sequence lengths use the binary k of context sizes (`8k` = 8,192, `128k` = 131,072: Llama-3.1's
"128k context" is 131,072 tokens); token budgets use decimal suffixes (`100M` = 100,000,000, `1.5B`).
"""

from __future__ import annotations

import argparse
import math
import re

from .errors import shown

BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20}
DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_NUMBER = re.compile(r"(\d+(?:\.\d{1,6})?)\s*([a-z]?)")
_MAX_DIGITS = 18  # beyond any bound a flag has; longer numbers are refused before int() meets its digit limit


def scaled(text: str, units: dict[str, int]) -> int | None:
    """'8k' -> 8 * units['k'], '2048' -> 2048; None when the text is not such a number (or not whole)."""
    m = _NUMBER.fullmatch(text.strip().lower().replace("_", "").replace(",", ""))
    if not m or m.group(2) not in units:
        return None
    number, unit = m.group(1), units[m.group(2)]
    if len(number.split(".")[0]) > _MAX_DIGITS:
        return 10**_MAX_DIGITS  # out of every range: the caller names the bounds
    if "." not in number:
        return int(number) * unit
    value = float(number) * unit
    return int(value) if value.is_integer() else None


def count(lo: int = 1, hi: int | None = None, units: dict[str, int] | None = None, what: str = "a whole number"):
    """A whole number in [lo, hi], optionally with a suffix from `units`."""
    units = units or {"": 1}
    examples = {id(BINARY): " (e.g. 2048 or 8k)", id(DECIMAL): " (e.g. 100000000 or 100M)"}.get(id(units), "")

    def parse(text: str) -> int:
        v = scaled(text, units)
        if v is None:
            raise argparse.ArgumentTypeError(f"expected {what}{examples}, got {shown(text)}")
        if v < lo or (hi is not None and v > hi):
            bound = f"between {lo:,} and {hi:,}" if hi is not None else f"at least {lo:,}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {shown(text.strip(), 40)}")
        return v

    return parse


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A finite number in the given range (NaN and infinity are never a setting)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {shown(text)}") from None
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if not math.isfinite(v) or bad_lo or bad_hi:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            rng = f"in {left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
            raise argparse.ArgumentTypeError(f"expected a finite number {rng}, got {shown(text)}")
        return int(v) if v.is_integer() and abs(v) < 2**53 else v

    return parse


def choice(options) -> callable:
    """Case-insensitive choice: `--method QLoRA` is `qlora`. Pair with `choices=` for argparse's message."""
    lowered = {o.lower(): o for o in options}

    def parse(text: str) -> str:
        return lowered.get(text.strip().lower(), text)

    return parse


def shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4): the i-th of n machines."""
    m = re.fullmatch(r"\s*(\d{1,4})\s*/\s*(\d{1,4})\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected i/n with 1 <= i <= n <= 9999, e.g. 1/4; got {shown(text)}")
    return int(m.group(1)), int(m.group(2))
