"""A pure-Python model of PyTorch's CUDA caching allocator: one device, one stream, no CUDA graphs.

Replays a sequence of allocations and frees (a trace of a training step) and reports what
`torch.cuda.max_memory_allocated()` / `max_memory_reserved()` would say, the fragmentation at the reserved
peak, or the out-of-memory error torch would raise on a device of a given capacity.

Source modelled (functions named in the comments below):
- c10/cuda/CUDACachingAllocator.cpp, class DeviceCachingAllocator, read at github cyyever/pytorch
  @076f02792ce54ef5fe47818d061755430c9973e1, a fork of pytorch main slightly newer than v2.13.0 (the pytorch
  repository itself was too large to fetch, and the index holds no v2.13.0 copy of this file). Newer than
  2.13 there and not modelled: the expandable_segments_reserve* options (absent from 2.13's
  CUDAAllocatorConfig.h). What 2.13's installed headers show agrees with it: registration_counter in
  SegmentInfo, getMemoryFraction, throw_on_cudamalloc_oom, large_segment_size. Compared with the older
  pytorch/pytorch @001074d2 the modelled rules differ only in: max_non_split_rounding / large_segment_size
  (then fixed at 20 MiB), a memory fraction of 1.0 now meaning "no limit", gc skipping expandable segments.
- c10/core/AllocatorConfig.cpp/.h (AcceleratorAllocatorConfig) at cyyever/pytorch @106319cb and
  c10/cuda/CUDAAllocatorConfig.cpp/.h at @0b2b76de, checked against the installed torch 2.13.0 wheel
  (git cf30153c): its AllocatorConfig.h and CUDAAllocatorConfig.h, the error strings in libc10.so, and its
  own parser (torch._C._accelerator_setAllocatorSettings; roundup_power2_divisions read back from libc10.so).

Modelled: round_size (incl. roundup_power2_divisions), the small/large pools, get_allocation_size
(incl. large_segment_size_mb), best fit on (size, segment order, address), get_free_block's max_split_size /
max_non_split_rounding rules, should_split, alloc_found_block, free_block + try_merge_blocks,
garbage_collect_cached_blocks (block ages counted in get_free_block calls), alloc_block (cudaMalloc fails
past the device capacity; per_process_memory_fraction; throw_on_cudamalloc_oom),
release_available_cached_blocks, release_cached_blocks (empty_cache and the OOM retry), and expandable
segments (find_expandable_block, map_block, try_allocate_expandable_block, unmap_block, release_blocks).
Not modelled: several streams (record_stream, events), CUDA graphs and private mempools, IPC,
mallocWithAddress, the free-memory callbacks (none are registered outside CUDA IPC), backend:cudaMallocAsync,
memory outside the allocator (CUDA context, cuBLAS handles, other processes).

Addresses are synthetic: each new segment starts above every earlier one, so ordering by address equals
torch's (size, registration_counter, ptr) order, registration_counter being the segment's creation order.
"""

from __future__ import annotations

import math
import operator
import re
from bisect import bisect_left, insort
from dataclasses import dataclass, field

from ..errors import InputError, closest

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# c10/core/AllocatorConfig.h (torch 2.13): "all sizes are rounded to at least 512 bytes"
K_MIN_BLOCK_SIZE = 512
# c10/core/AllocatorConfig.h kSmallSize: "largest 'small' allocation is 1 MiB"
K_SMALL_SIZE = MiB
# c10/core/AllocatorConfig.h kSmallBuffer: "'small' allocations are packed in 2 MiB blocks"; also the small
# pool's expandable-segment page (find_expandable_block: `pool->is_small ? kSmallBuffer : large_segment_size()`)
K_SMALL_BUFFER = 2 * MiB
# c10/core/AllocatorConfig.h kMinLargeAlloc: "allocations between 1 and 10 MiB may use kLargeBuffer"
K_MIN_LARGE_ALLOC = 10 * MiB
# c10/core/AllocatorConfig.h kRoundLarge: "round up large allocations to 2 MiB"
K_ROUND_LARGE = 2 * MiB
# AcceleratorAllocatorConfig::large_segment_size_ default (AllocatorConfig.h: 20971520, "20 MB by default"),
# the old kLargeBuffer: the segment for 1-10 MiB requests and the large pool's expandable-segment page
K_LARGE_BUFFER = 20 * MiB
# AllocatorConfig.cpp kRoundUpPowerOfTwoIntervals: one roundup_power2_divisions entry per power of two,
# from kRoundUpPowerOfTwoStart (1 MiB) to kRoundUpPowerOfTwoEnd (64 GiB)
ROUNDUP_INTERVALS = 16
# NativeCachingAllocator::allocate: "CUDA out of memory. Tried to allocate more than 1EB memory."
ONE_EXA_BYTES = 1152921504606846976
# CUDAAllocatorConfig::pinned_max_register_threads() returns 128
MAX_PINNED_REGISTER_THREADS = 128

# The free-block set is one sorted list of ints (size << _SHIFT | address): bisect on ints is much faster than
# on tuples, and it orders like torch's BlockComparatorSizeCounterAddress with one stream.
_SHIFT = 80
# Virtual address space of an expandable segment when the capacity is unknown (torch reserves 9/8 of the
# device: ExpandableSegment's constructor, `prop.totalGlobalMem + prop.totalGlobalMem / 8`)
_UNLIMITED_VA = 1 << 60
_NO_LIMIT = 1 << 200  # max_split_size when unset (torch: std::numeric_limits<size_t>::max())

_CONF = "PYTORCH_CUDA_ALLOC_CONF"
_WHOLE = re.compile(r"[0-9]+")
_REAL = re.compile(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")


# ------------------------------------------------------------------------------------------------ config


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _divisions_index(size: int) -> int:
    """AcceleratorAllocatorConfig::roundup_power2_divisions(size): which interval (1 MiB .. 64 GiB) size is in."""
    index = size.bit_length() - 1 - 20  # log2(size) - log2(kRoundUpPowerOfTwoStart)
    return 0 if index < 0 else (index if index < ROUNDUP_INTERVALS else ROUNDUP_INTERVALS - 1)


@dataclass(frozen=True)
class AllocatorConfig:
    """The memory-relevant part of PYTORCH_CUDA_ALLOC_CONF (parse / to_text), with torch's defaults."""

    max_split_size: int | None = None  # bytes; None = no limit (max_split_size_mb)
    expandable_segments: bool = False
    garbage_collection_threshold: float | None = None  # in (0, 1); acts only with a memory fraction < 1
    # Divisions per size interval, as torch stores them: 16 entries, entry i for requests of [2^i, 2^(i+1)) MiB
    # (entry 0 also below 1 MiB, entry 15 also above 64 GiB); 0 or 1 = plain 512-byte rounding. None = all 0.
    # An int is accepted and means "this for every interval".
    roundup_power2_divisions: tuple[int, ...] | None = None
    large_segment_size: int = K_LARGE_BUFFER  # bytes (large_segment_size_mb): the 1-10 MiB segment and page
    max_non_split_rounding_size: int | None = None  # bytes (max_non_split_rounding_mb); None = large_segment_size
    per_process_memory_fraction: float = 1.0  # torch.cuda.set_per_process_memory_fraction, from the config
    throw_on_cudamalloc_oom: bool = False

    def __post_init__(self):
        div = self.roundup_power2_divisions
        if div is not None:
            if isinstance(div, int) and not isinstance(div, bool):
                div = (div,) * ROUNDUP_INTERVALS
            div = tuple(div)
            if len(div) != ROUNDUP_INTERVALS or any(
                not isinstance(d, int) or isinstance(d, bool) or not (d == 0 or _is_pow2(d)) for d in div
            ):
                raise InputError(
                    f"roundup_power2_divisions: expected {ROUNDUP_INTERVALS} divisions, each 0 or a power of 2"
                    f", got {div!r}"
                )
            object.__setattr__(self, "roundup_power2_divisions", None if not any(div) else div)
        lss = self.large_segment_size
        if not _whole_mib(lss) or lss <= K_MIN_LARGE_ALLOC:
            raise InputError(f"large_segment_size must be a whole number of MiB above 10 MiB, got {lss!r}")
        for name in ("max_split_size", "max_non_split_rounding_size"):
            v = getattr(self, name)
            if v is not None and (not _whole_mib(v) or v < lss):
                raise InputError(f"{name} must be a whole number of MiB >= {lss // MiB} MiB, got {v!r}")
        if self.max_non_split_rounding_size == lss:  # the default: keep one canonical form
            object.__setattr__(self, "max_non_split_rounding_size", None)
        t = self.garbage_collection_threshold
        if t is not None and (not _real(t) or not 0 < t < 1):
            raise InputError(f"garbage_collection_threshold must be in (0, 1), got {t!r}")
        f = self.per_process_memory_fraction
        if not _real(f) or not 0 <= f <= 1:
            raise InputError(f"per_process_memory_fraction must be in [0, 1], got {f!r}")
        for name in ("expandable_segments", "throw_on_cudamalloc_oom"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def divisions(self, size: int) -> int:
        """roundup_power2_divisions(size) as torch looks it up (0 when unset)."""
        div = self.roundup_power2_divisions
        return 0 if div is None else div[_divisions_index(size)]

    @classmethod
    def parse(cls, text: str) -> AllocatorConfig:
        """PYTORCH_CUDA_ALLOC_CONF text -> config; InputError (one line) on what torch would refuse."""
        if not isinstance(text, str):
            raise InputError(f"{_CONF}: expected text, got {type(text).__name__}")
        return cls(**_parse_conf(text))

    def to_text(self) -> str:
        """Canonical PYTORCH_CUDA_ALLOC_CONF text ('' for the defaults); parse(to_text()) == self."""
        parts = []
        if self.large_segment_size != K_LARGE_BUFFER:
            parts.append(f"large_segment_size_mb:{self.large_segment_size // MiB}")
        if self.max_split_size is not None:
            parts.append(f"max_split_size_mb:{self.max_split_size // MiB}")
        if self.max_non_split_rounding_size is not None:
            parts.append(f"max_non_split_rounding_mb:{self.max_non_split_rounding_size // MiB}")
        if self.garbage_collection_threshold is not None:
            parts.append(f"garbage_collection_threshold:{self.garbage_collection_threshold!r}")
        if self.roundup_power2_divisions is not None:
            parts.append(f"roundup_power2_divisions:{_divisions_text(self.roundup_power2_divisions)}")
        if self.expandable_segments:
            parts.append("expandable_segments:True")
        if self.per_process_memory_fraction != 1.0:
            parts.append(f"per_process_memory_fraction:{float(self.per_process_memory_fraction)!r}")
        if self.throw_on_cudamalloc_oom:
            parts.append("throw_on_cudamalloc_oom:True")
        return ",".join(parts)


def _whole_mib(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % MiB == 0


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _divisions_text(div: tuple[int, ...]) -> str:
    """Shortest text torch's parser turns back into exactly this table (parseRoundUpPower2Divisions)."""
    if len(set(div)) == 1:
        return str(div[0])  # never 0 here (all zeros is None); the scalar form needs a power of 2
    runs = []  # [start, value] of equal neighbours
    for i, d in enumerate(div):
        if runs and runs[-1][1] == d:
            continue
        runs.append([i, d])
    # the first entry fills every interval below it; ">" fills every interval after the last one given
    items = [f"{1 << (runs[1][0] - 1)}:{runs[0][1]}"]
    for k in range(1, len(runs) - 1):
        start, value = runs[k]
        items += [f"{1 << i}:{value}" for i in range(start, runs[k + 1][0])]
    items.append(f">:{runs[-1][1]}")
    return "[" + ",".join(items) + "]"


# Keys torch 2.13 accepts that do not change device memory (pinned host memory, locking, graph capture reuse):
# AcceleratorAllocatorConfig::getMutableKeys and CUDAAllocatorConfig::getKeys / parseArgs. Checked, then ignored.
_BOOL_IGNORED = {
    "pinned_use_background_threads",
    "release_lock_on_cudamalloc",
    "release_lock_on_hipmalloc",
    "pinned_use_cuda_host_register",
    "pinned_use_hip_host_register",
    "graph_capture_record_stream_reuse",
    "pinned_free_catch_all",
}
_WHOLE_IGNORED = {"pinned_max_round_threshold_mb", "pinned_max_cached_size_mb"}
_MEMORY_KEYS = (
    "large_segment_size_mb",
    "max_split_size_mb",
    "max_non_split_rounding_mb",
    "garbage_collection_threshold",
    "roundup_power2_divisions",
    "expandable_segments",
    "per_process_memory_fraction",
    "throw_on_cudamalloc_oom",
    "backend",
)
_ALL_KEYS = sorted(
    {*_MEMORY_KEYS, *_BOOL_IGNORED, *_WHOLE_IGNORED, "pinned_num_register_threads", "pinned_reserve_segment_size_mb"}
)


def _tokens(text: str) -> list[str]:
    """ConfigTokenizer: ',', ':', '[' and ']' are tokens; whitespace is dropped everywhere, even inside words."""
    out, buf = [], []
    for ch in text:
        if ch in ",:[]":
            if buf:
                out.append("".join(buf))
                buf = []
            out.append(ch)
        elif not ch.isspace():
            buf.append(ch)
    if buf:
        out.append("".join(buf))
    return out


def _items(text: str) -> list[tuple[str, str | list[str]]]:
    """key:value pairs (a value is a token or the tokens of a [...] list), in order; structure errors."""
    tok, items, i = _tokens(text), [], 0
    n = len(tok)
    while i < n:
        key = tok[i]
        if key in ",:[]":
            where = f"after '{items[-1][0]}'" if items else "at the start"
            raise InputError(f"{_CONF}: expected a key {where}, found '{key}' (write key:value,key:value)")
        if i + 1 >= n or tok[i + 1] != ":":
            raise InputError(f"{_CONF}: '{key}' needs a value ('{key}:<value>')")
        if i + 2 >= n or tok[i + 2] in ",:]":
            raise InputError(f"{_CONF}: '{key}' needs a value after ':'")
        if tok[i + 2] == "[":
            j = i + 3
            while j < n and tok[j] != "]":
                j += 1
            if j >= n:
                raise InputError(f"{_CONF}: '{key}:[' has no closing ']'")
            items.append((key, tok[i + 3 : j]))
            i = j + 1
        else:
            items.append((key, tok[i + 2]))
            i += 3
        if i < n:
            if tok[i] != ",":
                shown = f"{key}:{tok[i - 1]}" if isinstance(items[-1][1], str) else key
                raise InputError(
                    f"{_CONF}: expected ',' after '{shown}', found '{tok[i]}' (separate settings with ',')"
                )
            i += 1
            if i >= n:
                raise InputError(f"{_CONF}: trailing ',' after '{key}'")
    return items


def _scalar(key: str, value) -> str:
    if isinstance(value, list):
        raise InputError(f"{_CONF}: {key} takes a single value, not a [...] list")
    return value


def _whole(key: str, value) -> int:
    v = _scalar(key, value)
    if not _WHOLE.fullmatch(v):
        raise InputError(f"{_CONF}: {key}:{v} is not a whole number")
    return int(v)


def _number(key: str, value) -> float:
    v = _scalar(key, value)
    if not _REAL.fullmatch(v):
        raise InputError(f"{_CONF}: {key}:{v} is not a number")
    return float(v)


def _flag(key: str, value) -> bool:
    v = _scalar(key, value)
    if v not in ("True", "False"):  # ConfigTokenizer::toBool: exactly 'True' or 'False'
        raise InputError(f"{_CONF}: {key}:{v} must be True or False (capitalised, as torch requires)")
    return v == "True"


def _roundup(value, table: list[int]) -> None:
    """AcceleratorAllocatorConfig::parseRoundUpPower2Divisions, applied onto `table` (16 entries)."""
    key = "roundup_power2_divisions"
    if not isinstance(value, list):  # scalar form: every interval
        d = _whole(key, value)
        if not _is_pow2(d):
            raise InputError(f"{_CONF}: {key}:{d} must be a power of 2 (1, 2, 4, 8, ...)")
        table[:] = [d] * ROUNDUP_INTERVALS
        return
    first, last_index, i, n = True, 0, 0, len(value)
    while i < n:
        bound = value[i]
        if i + 2 >= n or value[i + 1] != ":" or value[i + 2] in ",:":
            raise InputError(f"{_CONF}: {key}: expected <MiB>:<divisions> or >:<divisions> in [...], at '{bound}'")
        d = _whole(key, value[i + 2])
        if d != 0 and not _is_pow2(d):
            raise InputError(f"{_CONF}: {key}: divisions {d} must be 0 or a power of 2")
        if bound == ">":  # every interval after the last one given
            for j in range(last_index + 1, ROUNDUP_INTERVALS):
                table[j] = d
        else:
            if not _WHOLE.fullmatch(bound) or not _is_pow2(int(bound)):
                raise InputError(f"{_CONF}: {key}: interval '{bound}' must be a power of 2 in MiB (1, 2, 4, ...)")
            index = min(int(bound).bit_length() - 1, ROUNDUP_INTERVALS - 1)
            if first:  # the first interval given also sets every interval below it
                table[:index] = [d] * index
                first = False
            table[index] = d
            last_index = index
        i += 3
        if i < n:
            if value[i] != ",":
                raise InputError(f"{_CONF}: {key}: expected ',' between entries, found '{value[i]}'")
            i += 1
            if i >= n:
                raise InputError(f"{_CONF}: {key}: trailing ',' inside [...]")


def _parse_conf(text: str) -> dict:
    items = _items(text)
    out: dict = {}
    # AcceleratorAllocatorConfig::parseArgs reads large_segment_size_mb first: the lower bounds of
    # max_split_size_mb and max_non_split_rounding_mb depend on it
    large = K_LARGE_BUFFER
    for key, value in items:
        if key == "large_segment_size_mb":
            v = _whole(key, value)
            if v * MiB <= K_MIN_LARGE_ALLOC:  # parseLargeSegmentSize: val_env > kMinLargeAlloc / kMB
                raise InputError(f"{_CONF}: large_segment_size_mb:{v} must be > {K_MIN_LARGE_ALLOC // MiB} (MiB)")
            large = v * MiB
    out["large_segment_size"] = large
    table: list[int] | None = None
    for key, value in items:
        if key == "large_segment_size_mb":
            continue
        if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            v = _whole(key, value)
            if v * MiB < large:  # parseMaxSplitSize / parseMaxNonSplitRoundingSize: >= large_segment_size_ / kMB
                raise InputError(f"{_CONF}: {key}:{v} is too small; torch requires >= {large // MiB} (MiB)")
            out["max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding_size"] = v * MiB
        elif key == "garbage_collection_threshold":
            v = _number(key, value)
            if not 0 < v < 1:  # parseGarbageCollectionThreshold: (0.0, 1.0)
                raise InputError(f"{_CONF}: {key}:{value} must be between 0 and 1, exclusive (e.g. 0.8)")
            out["garbage_collection_threshold"] = v
        elif key == "roundup_power2_divisions":
            table = table or [0] * ROUNDUP_INTERVALS  # parseArgs resets it once; repeated keys add up
            _roundup(value, table)
        elif key in ("expandable_segments", "throw_on_cudamalloc_oom"):
            out[key] = _flag(key, value)
        elif key == "per_process_memory_fraction":
            v = _number(key, value)
            if not 0 <= v <= 1:  # parsePerProcessMemoryFraction: [0.0, 1.0]
                raise InputError(f"{_CONF}: {key}:{value} must be between 0 and 1 (e.g. 0.9)")
            out[key] = v
        elif key == "backend":
            v = _scalar(key, value)
            if v == "cudaMallocAsync":
                raise InputError(
                    f"{_CONF}: backend:cudaMallocAsync is not modelled (CUDA's stream-ordered allocator); "
                    "this model covers backend:native, the default"
                )
            if v != "native":  # parseAllocatorConfig: "options are native and cudaMallocAsync"
                raise InputError(f"{_CONF}: backend:{v} is unknown; torch accepts native or cudaMallocAsync")
        elif key in _BOOL_IGNORED:
            _flag(key, value)
        elif key in _WHOLE_IGNORED:
            _whole(key, value)
        elif key == "pinned_num_register_threads":
            v = _whole(key, value)
            if not _is_pow2(v) or v > MAX_PINNED_REGISTER_THREADS:  # parsePinnedNumRegisterThreads
                raise InputError(f"{_CONF}: {key}:{v} must be a power of 2 <= {MAX_PINNED_REGISTER_THREADS}")
        elif key == "pinned_reserve_segment_size_mb":
            if _whole(key, value) <= 0:  # parsePinnedReserveSegmentSize: > 0
                raise InputError(f"{_CONF}: {key} must be > 0")
        else:
            near = closest(key, _ALL_KEYS)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(_MEMORY_KEYS)}"
            raise InputError(f"{_CONF}: unknown key '{key}'{hint}")
    if table is not None:
        out["roundup_power2_divisions"] = tuple(table)
    return out


# ------------------------------------------------------------------------------------------------ errors


def format_size(size: int) -> str:
    """c10/core/Allocator.h format_size: how torch prints sizes in its OOM message."""
    if size <= 1024:
        return f"{size} bytes"
    if size <= MiB:
        return f"{size / 1024:.2f} KiB"
    if size <= GiB:
        return f"{size / MiB:.2f} MiB"
    return f"{size / GiB:.2f} GiB"


class OutOfMemory(Exception):
    """What torch.OutOfMemoryError would report (DeviceCachingAllocator::malloc), with the numbers as fields."""

    def __init__(
        self,
        *,
        requested: int,
        size: int,
        tried_to_allocate: int,
        allocated: int,
        reserved: int,
        capacity: int | None,
        allowed: int | None = None,
        rejected: bool = False,
    ):
        self.requested = requested  # bytes asked for
        self.size = size  # after round_size
        self.tried_to_allocate = tried_to_allocate  # get_allocation_size(size): the number torch prints
        self.allocated = allocated
        self.reserved = reserved  # after the cache was released (release_cached_blocks ran before the raise)
        self.capacity = capacity
        self.free = None if capacity is None else max(capacity - reserved, 0)  # cudaMemGetInfo, in this model
        self.allowed = allowed  # per-process memory fraction x capacity, when set
        self.rejected = rejected  # throw_on_cudamalloc_oom refused it before any cudaMalloc
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if self.requested >= ONE_EXA_BYTES:
            return "CUDA out of memory. Tried to allocate more than 1EB memory."
        if self.rejected:
            return (
                "CUDA out of memory. Allocation was preemptively rejected because it would exceed "
                f"per_process_memory_fraction limit. Requested size: {format_size(self.requested)}"
            )
        allowed = "" if self.allowed is None else f"{format_size(self.allowed)} allowed; "
        cap = "unknown" if self.capacity is None else format_size(self.capacity)
        free = "unknown" if self.free is None else format_size(self.free)
        return (
            f"CUDA out of memory. Tried to allocate {format_size(self.tried_to_allocate)}. GPU 0 has a total "
            f"capacity of {cap} of which {free} is free. {allowed}Of the allocated memory "
            f"{format_size(self.allocated)} is allocated by PyTorch, and "
            f"{format_size(self.reserved - self.allocated)} is reserved by PyTorch but unallocated."
        )

    def as_dict(self) -> dict:
        return {
            "requested": self.requested,
            "size": self.size,
            "tried_to_allocate": self.tried_to_allocate,
            "allocated": self.allocated,
            "reserved": self.reserved,
            "reserved_unallocated": self.reserved - self.allocated,
            "capacity": self.capacity,
            "free": self.free,
            "allowed": self.allowed,
            "rejected": self.rejected,
            "message": self.message,
        }


# ------------------------------------------------------------------------------------------------ allocator


class _Segment:
    """One cudaMalloc, or one ExpandableSegment (its whole virtual range; `page` = its mapping granularity)."""

    __slots__ = ("base", "size", "is_small", "expandable", "page", "mapped")

    def __init__(self, base: int, size: int, is_small: bool, expandable: bool, page: int):
        self.base, self.size, self.is_small, self.expandable, self.page = base, size, is_small, expandable, page
        self.mapped = size  # bytes backed by memory (an expandable segment starts with none)


class _Block:
    """struct Block: a slice of a segment, allocated or free; prev/next link the slices of one segment."""

    __slots__ = ("addr", "size", "seg", "allocated", "mapped", "prev", "next", "gc_base", "tag")

    def __init__(self, addr: int, size: int, seg: _Segment):
        self.addr = addr
        self.size = size
        self.seg = seg
        self.allocated = False
        self.mapped = True  # False only for the unmapped address space of an expandable segment
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.gc_base = 0  # gc_count_base: the pool's get_free_block count when the block was cached
        self.tag = None


class _Pool:
    """struct BlockPool: the cached free blocks of one pool (small or large) and, for expandable segments, the
    unmapped ranges (`unmapped`, ordered by address like BlockComparatorAddress)."""

    __slots__ = ("keys", "blocks", "is_small", "gc_calls", "un_addrs", "unmapped")

    def __init__(self, is_small: bool):
        self.keys: list[int] = []  # sorted (size << _SHIFT | address)
        self.blocks: dict[int, _Block] = {}
        self.is_small = is_small
        self.gc_calls = 0  # get_free_blocks_call_count
        self.un_addrs: list[int] = []
        self.unmapped: dict[int, _Block] = {}

    def insert(self, b: _Block) -> None:  # BlockPool::insert_into_blocks
        b.gc_base = self.gc_calls
        k = (b.size << _SHIFT) | b.addr
        insort(self.keys, k)
        self.blocks[k] = b

    def erase(self, b: _Block) -> None:  # BlockPool::erase_from_blocks
        k = (b.size << _SHIFT) | b.addr
        keys = self.keys
        del keys[bisect_left(keys, k)]
        del self.blocks[k]

    def add_unmapped(self, b: _Block) -> None:
        insort(self.un_addrs, b.addr)
        self.unmapped[b.addr] = b

    def remove_unmapped(self, b: _Block) -> None:
        del self.un_addrs[bisect_left(self.un_addrs, b.addr)]
        del self.unmapped[b.addr]


@dataclass(frozen=True)
class Segment:
    """A segment as torch.cuda.memory_snapshot() shows it; an expandable segment shows one per mapped range."""

    address: int
    size: int
    is_small: bool
    is_expandable: bool
    blocks: tuple[tuple[int, int, bool], ...]  # (offset in the segment, size, allocated?)


class CachingAllocator:
    """DeviceCachingAllocator for one device and one stream.

    capacity: the bytes cudaMalloc / cuMemCreate can get (None = unlimited, no OOM). The model uses it also
    where torch uses the device's total memory (the memory fraction, the expandable address space), so pass
    the device's memory less what the CUDA context and other processes hold.

    malloc(key, nbytes) / free(key) / empty_cache(); allocated / reserved / peak_allocated / peak_reserved are
    torch's allocated_bytes / reserved_bytes stats (allocated counts whole blocks: an unsplit remainder counts).
    """

    def __init__(self, config: AllocatorConfig | None = None, capacity: int | None = None):
        if config is None:
            config = AllocatorConfig()
        elif not isinstance(config, AllocatorConfig):
            raise InputError(f"config must be an AllocatorConfig, got {type(config).__name__}")
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0):
            raise InputError(f"capacity must be a positive number of bytes or None, got {capacity!r}")
        self.config = config
        self.capacity = capacity
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.n_segments = 0  # cudaMalloc'd segments + expandable segments with mapped pages
        self.num_alloc_retries = 0
        self.num_ooms = 0
        self._small = _Pool(True)
        self._large = _Pool(False)
        self._live: dict = {}  # key -> allocated _Block
        self._next_addr = K_ROUND_LARGE  # synthetic addresses, never reused (see the module docstring)
        self._max_split = _NO_LIMIT if config.max_split_size is None else config.max_split_size
        self._large_segment = config.large_segment_size
        self._non_split_rounding = config.max_non_split_rounding_size or config.large_segment_size
        self._div = config.roundup_power2_divisions
        self._expandable = config.expandable_segments
        self._exp_segments: list[_Segment] = []
        self._rejected = False
        self._allowed: int | None = None
        self._gc_on = False
        self.set_memory_fraction(config.per_process_memory_fraction)

    # -- public API

    def set_memory_fraction(self, fraction: float) -> None:
        """torch.cuda.set_per_process_memory_fraction (DeviceCachingAllocator::setMemoryFraction)."""
        if not _real(fraction) or not 0 <= fraction <= 1:
            raise InputError(f"memory fraction must be in [0, 1], got {fraction!r}")
        self._allowed = None
        if fraction < 1.0:
            if self.capacity is None:
                raise InputError("a per-process memory fraction below 1 needs the device capacity")
            self._allowed = math.floor(fraction * self.capacity + 0.5)  # std::round
        # get_free_block / malloc: garbage collection runs only with allowed_memory_maximum set
        t = self.config.garbage_collection_threshold
        self._gc_on = self._allowed is not None and t is not None and t > 0

    def malloc(self, key, nbytes: int) -> None:
        if key in self._live:
            raise InputError(f"malloc: key {key!r} is already allocated; free it first")
        nbytes = _check_nbytes(nbytes)
        if nbytes:  # NativeCachingAllocator::allocate: size 0 gets no block
            self._malloc(key, nbytes)

    def free(self, key) -> None:
        self._free(self._live.pop(key))  # KeyError for an unknown key

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): DeviceCachingAllocator::emptyCache -> release_cached_blocks."""
        self._release_cached_blocks()

    def reset_peak_stats(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def round_size(self, nbytes: int) -> int:
        """DeviceCachingAllocator::round_size."""
        if nbytes < K_MIN_BLOCK_SIZE:
            return K_MIN_BLOCK_SIZE
        div = self._div
        if div is not None:
            d = div[_divisions_index(nbytes)]
            if d > 1 and nbytes > K_MIN_BLOCK_SIZE * d:
                return roundup_power2_next_division(nbytes, d)
        return (nbytes + K_MIN_BLOCK_SIZE - 1) & -K_MIN_BLOCK_SIZE

    def allocation_size(self, size: int) -> int:
        """DeviceCachingAllocator::get_allocation_size: the segment a new cudaMalloc gets for a rounded size."""
        if size <= K_SMALL_SIZE:
            return K_SMALL_BUFFER
        if size < K_MIN_LARGE_ALLOC:
            return self._large_segment
        return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE

    def segments(self) -> list[Segment]:
        """The segments and their blocks, by address (like torch.cuda.memory_snapshot(); mapped memory only)."""
        by_seg: dict[_Segment, list[_Block]] = {}
        for b in [*self._live.values(), *self._small.blocks.values(), *self._large.blocks.values()]:
            by_seg.setdefault(b.seg, []).append(b)
        out = []
        for seg, blocks in by_seg.items():
            blocks.sort(key=lambda b: b.addr)
            run: list[_Block] = []
            for b in blocks:
                if run and run[-1].addr + run[-1].size != b.addr:  # an unmapped gap ends a mapped range
                    out.append(_segment_info(seg, run))
                    run = []
                run.append(b)
            out.append(_segment_info(seg, run))
        out.sort(key=lambda s: s.address)
        return out

    # -- malloc (DeviceCachingAllocator::malloc)

    def _malloc(self, key, nbytes: int) -> _Block:
        if nbytes >= ONE_EXA_BYTES:
            raise OutOfMemory(
                requested=nbytes,
                size=nbytes,
                tried_to_allocate=nbytes,
                allocated=self.allocated,
                reserved=self.reserved,
                capacity=self.capacity,
            )
        if self._div is None:
            size = (
                K_MIN_BLOCK_SIZE if nbytes < K_MIN_BLOCK_SIZE else (nbytes + K_MIN_BLOCK_SIZE - 1) & -K_MIN_BLOCK_SIZE
            )
        else:
            size = self.round_size(nbytes)
        pool = self._small if size <= K_SMALL_SIZE else self._large
        block = self._get_free_block(pool, size)
        if block is None:
            if self._gc_on:
                self._garbage_collect_cached_blocks()
            self._rejected = False
            block = self._alloc_block(pool, size, False)
            if block is None and not self._rejected:
                # release_available_cached_blocks, then release_cached_blocks, each followed by one retry
                if self._release_available_cached_blocks(pool, size):
                    block = self._alloc_block(pool, size, False)
                if block is None:
                    self._release_cached_blocks()
                    block = self._alloc_block(pool, size, True)
            if block is None:
                self.num_ooms += 1
                raise OutOfMemory(
                    requested=nbytes,
                    size=size,
                    tried_to_allocate=self.allocation_size(size),
                    allocated=self.allocated,
                    reserved=self.reserved,
                    capacity=self.capacity,
                    allowed=self._allowed,
                    rejected=self._rejected,
                )
        # should_split: the small pool and expandable segments keep any remainder >= kMinBlockSize; the large
        # pool only one above kSmallSize, and never for requests >= max_split_size
        remaining = block.size - size
        if pool.is_small or self._expandable:
            split = remaining >= K_MIN_BLOCK_SIZE
        else:
            split = size < self._max_split and remaining > K_SMALL_SIZE
        if split:  # alloc_found_block: a new block takes the front, the old one stays cached as the remainder
            front = _Block(block.addr, size, block.seg)
            prev = block.prev
            front.prev = prev
            if prev is not None:
                prev.next = front
            front.next = block
            block.prev = front
            block.addr += size
            block.size = remaining
            pool.insert(block)
            block = front
        block.allocated = True
        self._live[key] = block
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        """DeviceCachingAllocator::get_free_block: best fit, then the max_split_size rules."""
        if self._gc_on:
            pool.gc_calls += 1  # block ages count get_free_block calls, only while gc is on
        keys = pool.keys
        i = bisect_left(keys, size << _SHIFT)
        n = len(keys)
        if i == n:
            return None
        blocks = pool.blocks
        b = blocks[keys[i]]
        if self._expandable:
            # a free block followed by unmapped space counts as the size it can grow to, so that best fit
            # prefers a block that needs no mapping
            nx = b.next
            grow = b.size + (nx.size if nx is not None and not nx.mapped else 0)
            j = i + 1
            while j < n:
                c = blocks[keys[j]]
                nx = c.next
                c_grow = c.size + (nx.size if nx is not None and not nx.mapped else 0)
                if c_grow >= grow:
                    break
                i, b, grow = j, c, c_grow
                j += 1
        max_split = self._max_split
        if size < max_split and b.size >= max_split:  # "Do not return an oversized block for a large request"
            return None
        if size >= max_split and b.size >= size + self._non_split_rounding:  # oversize: round up only so far
            return None
        del blocks[keys[i]]
        del keys[i]
        return b

    def _alloc_block(self, pool: _Pool, size: int, is_retry: bool) -> _Block | None:
        """DeviceCachingAllocator::alloc_block: a new segment (cudaMalloc) or more mapped pages."""
        alloc_size = self.allocation_size(size)
        if is_retry:
            self.num_alloc_retries += 1
        cap = self.capacity
        if self._allowed is not None and self.reserved + alloc_size > self._allowed:
            return None
        if self.config.throw_on_cudamalloc_oom and cap is not None:
            max_allowed = int(self.config.per_process_memory_fraction * cap)
            if self.reserved + alloc_size > max_allowed:
                self._rejected = True
                return None
        if self._expandable:
            return self._try_allocate_expandable_block(pool, size)
        if cap is not None and self.reserved + alloc_size > cap:
            return None  # cudaMalloc: cudaErrorMemoryAllocation
        seg = _Segment(self._next_addr, alloc_size, pool.is_small, False, alloc_size)
        self._next_addr += alloc_size + K_ROUND_LARGE
        self.n_segments += 1
        self.reserved += alloc_size
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        return _Block(seg.base, alloc_size, seg)

    # -- free (free_block, try_merge_blocks)

    def _free(self, b: _Block) -> None:
        b.allocated = False
        self.allocated -= b.size
        pool = self._small if b.seg.is_small else self._large
        p = b.prev
        if p is not None and not p.allocated and p.mapped:  # [prev b]: b takes prev's start
            pool.erase(p)
            b.addr = p.addr
            b.size += p.size
            b.prev = p = p.prev
            if p is not None:
                p.next = b
        n = b.next
        if n is not None and not n.allocated and n.mapped:  # [b next]
            pool.erase(n)
            b.size += n.size
            b.next = n = n.next
            if n is not None:
                n.prev = b
        pool.insert(b)

    def _merge(self, pool: _Pool, dst: _Block, src: _Block | None) -> None:
        """try_merge_blocks (used when mapping and unmapping expandable segments)."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        if src.mapped:
            pool.erase(src)
        else:
            pool.remove_unmapped(src)
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    # -- releasing cached memory

    def _release_block(self, b: _Block) -> None:
        """release_block: cudaFree a whole cached segment."""
        (self._small if b.seg.is_small else self._large).erase(b)
        self.reserved -= b.size
        self.n_segments -= 1

    def _garbage_collect_cached_blocks(self) -> None:
        """garbage_collect_cached_blocks: before a cudaMalloc, once reserved passes threshold x allowed memory,
        free whole cached large segments whose age (get_free_block calls since cached) is at least the average,
        pass after pass, until enough is reclaimed."""
        gc_threshold = int(self.config.garbage_collection_threshold * self._allowed)
        if self.reserved <= gc_threshold:
            return
        target = self.reserved - gc_threshold
        pool = self._large
        now = pool.gc_calls
        total_age = count = 0
        for k in pool.keys:
            b = pool.blocks[k]
            if b.prev is None and b.next is None:
                total_age += now - b.gc_base
                count += 1
        if count == 0:
            return
        reclaimed, freed = 0, True
        while reclaimed < target and freed and count > 0:
            age_threshold = total_age / count
            freed = False
            for k in list(pool.keys):  # torch keeps iterating past the target within one pass
                b = pool.blocks[k]
                age = now - b.gc_base
                if b.prev is None and b.next is None and not b.seg.expandable and age >= age_threshold:
                    freed = True
                    reclaimed += b.size
                    total_age -= age
                    count -= 1
                    self._release_block(b)

    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """release_available_cached_blocks: with max_split_size set, free the smallest cached oversize block
        that covers the request, else the largest ones until their sum does."""
        max_split = self._max_split
        if max_split == _NO_LIMIT:
            return False
        want = max(size, max_split)
        keys, blocks = pool.keys, pool.blocks
        i = bisect_left(keys, want << _SHIFT)
        if i == len(keys) or blocks[keys[i]].seg.expandable:
            if i == 0:
                return False
            released = 0
            i -= 1
            while released < want:
                b = blocks[keys[i]]
                if b.size < max_split:
                    break
                if not b.seg.expandable:
                    released += b.size
                    self._release_block(b)  # removes keys[i]; the smaller ones keep their indexes
                if i == 0:
                    break
                i -= 1
            return released >= want
        self._release_block(blocks[keys[i]])
        return True

    def _release_cached_blocks(self) -> None:
        """release_cached_blocks -> release_blocks(large), release_blocks(small)."""
        for pool in (self._large, self._small):
            to_unmap = []
            for k in list(pool.keys):
                b = pool.blocks[k]
                if b.seg.expandable:
                    to_unmap.append(b)
                elif b.prev is None and b.next is None:
                    self._release_block(b)
            for b in to_unmap:
                self._unmap_block(pool, b)
                if b.prev is None and b.next is None:  # release_expandable_segment: nothing mapped is left
                    pool.remove_unmapped(b)
                    self._exp_segments.remove(b.seg)

    # -- expandable segments

    def _try_allocate_expandable_block(self, pool: _Pool, size: int) -> _Block | None:
        """try_allocate_expandable_block: map pages at the lowest address with room, merging with free space."""
        c = self._find_expandable_block(pool, size)
        if c is None:
            return None
        if not c.mapped and not self._map_block(pool, c, min(c.size, size)):
            return None
        while c.size < size:  # free -> unmapped -> ...: map more behind it
            nxt = c.next
            if not self._map_block(pool, nxt, min(size - c.size, nxt.size)):
                return None
            c = nxt  # map_block merged the free block in front into it
        pool.erase(c)
        return c

    def _find_expandable_block(self, pool: _Pool, size: int) -> _Block | None:
        """find_expandable_block: the lowest unmapped range (with the free block before it) that can hold size,
        else a new ExpandableSegment."""
        for addr in pool.un_addrs:
            c = pool.unmapped[addr]
            p = c.prev
            if p is not None and not p.allocated:
                c = p
            room, x = 0, c
            while room < size and x is not None and not x.allocated:
                room += x.size
                x = x.next
            if room >= size:
                return c
        page = K_SMALL_BUFFER if pool.is_small else self._large_segment
        cap = self.capacity
        reserve = _UNLIMITED_VA if cap is None else cap + cap // 8  # 9/8 of the device's memory
        va = -(-reserve // page) * page
        if va < size:  # "A single allocation cannot span expandable segments"
            return None
        seg = _Segment(self._next_addr, va, pool.is_small, True, page)
        seg.mapped = 0
        self._next_addr += va + K_ROUND_LARGE
        self._exp_segments.append(seg)
        c = _Block(seg.base, va, seg)
        c.mapped = False
        pool.add_unmapped(c)
        return c

    def _map_block(self, pool: _Pool, b: _Block, size: int) -> bool:
        """map_block: map whole pages for the first `size` bytes of unmapped block b (all or nothing)."""
        page = b.seg.page
        mapped = -(-size // page) * page
        if self.capacity is not None and self.reserved + mapped > self.capacity:
            return False  # ExpandableSegment::map: cuMemCreate out of memory -> nothing mapped
        pool.remove_unmapped(b)
        b.mapped = True
        if mapped < b.size:
            rest = _Block(b.addr + mapped, b.size - mapped, b.seg)
            rest.mapped = False
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            pool.add_unmapped(rest)
            b.size = mapped
        self._merge(pool, b, b.prev)
        self._merge(pool, b, b.next)
        pool.insert(b)
        if not b.seg.mapped:
            self.n_segments += 1
        b.seg.mapped += mapped
        self.reserved += mapped
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        return True

    def _unmap_block(self, pool: _Pool, b: _Block) -> None:
        """unmap_block: unmap the whole pages inside free block b; the partial pages at its ends stay mapped."""
        seg, page = b.seg, b.seg.page
        first = -(-(b.addr - seg.base) // page)
        last = (b.addr + b.size - seg.base) // page
        if first >= last:
            return
        pool.erase(b)
        start, length = seg.base + first * page, (last - first) * page
        before = start - b.addr
        if before > 0:  # prev? -> before_free -> b
            bf = _Block(b.addr, before, seg)
            bf.prev, bf.next = b.prev, b
            if b.prev is not None:
                b.prev.next = bf
            b.prev = bf
            pool.insert(bf)
        after = b.size - before - length
        if after > 0:  # b -> after_free -> next?
            af = _Block(start + length, after, seg)
            af.prev, af.next = b, b.next
            if b.next is not None:
                b.next.prev = af
            b.next = af
            pool.insert(af)
        b.addr, b.size, b.mapped = start, length, False
        self._merge(pool, b, b.prev)
        self._merge(pool, b, b.next)
        pool.add_unmapped(b)
        seg.mapped -= length
        if not seg.mapped:
            self.n_segments -= 1
        self.reserved -= length


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """DeviceCachingAllocator::roundup_power2_next_division: round size up to the next of `divisions` equal
    steps between the powers of two around it (1200 with 4 divisions -> 1280)."""
    if _is_pow2(size):
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    low = size & ~(step - 1)
    return size if low == size else low + step


def _segment_info(seg: _Segment, run: list[_Block]) -> Segment:
    base = run[0].addr
    return Segment(
        address=base,
        size=sum(b.size for b in run),
        is_small=seg.is_small,
        is_expandable=seg.expandable,
        blocks=tuple((b.addr - base, b.size, b.allocated) for b in run),
    )


def _check_nbytes(nbytes) -> int:
    if not isinstance(nbytes, bool):
        try:
            value = operator.index(nbytes)  # ints, numpy integers
        except TypeError:
            pass
        else:
            if value >= 0:
                return value
            raise InputError(f"nbytes must be >= 0, got {value}")
    raise InputError(f"nbytes must be a whole number of bytes, got {nbytes!r}")


# ------------------------------------------------------------------------------------------------ replay


@dataclass
class Replay:
    peak_allocated: int
    peak_reserved: int
    allocated_at_peak_reserved: int  # after the event during which reserved peaked
    fragmentation_at_peak: int  # reserved - allocated then: cached, unused bytes
    peak_reserved_phase: str | None  # the phase marker in force when reserved peaked
    peak_allocated_phase: str | None
    live_by_tag_at_peak: dict[str, int]  # allocated bytes (block sizes) by tag at the allocated peak
    segments_at_peak: int  # cudaMalloc'd segments + expandable segments with mapped pages, at the reserved peak
    n_events: int  # events read (up to and including an OOM)
    oom: dict | None  # OutOfMemory.as_dict() + event, key, tag, phase; the replay stops there
    # (event index, allocated, reserved) after that event: at most timeline_points, evenly spread, plus the
    # two peak events (kept even when timeline_points < 2); empty when timeline_points is 0
    timeline: list[tuple[int, int, int]] = field(default_factory=list)
    peak_allocated_event: int | None = None
    peak_reserved_event: int | None = None
    alloc_retries: int = 0  # cudaMalloc failures survived by freeing cached blocks (torch's num_alloc_retries)


def replay(
    events, config: AllocatorConfig | None = None, capacity: int | None = None, timeline_points: int = 0
) -> Replay:
    """Run events through a CachingAllocator: ("alloc", key, nbytes, tag) | ("free", key) | ("phase", name) |
    ("empty_cache",) | ("reset_peaks",) (what `torch.cuda.empty_cache()` and `reset_peak_memory_stats()` do: peft's
    kbit preparation calls the first, the runner the second after loading).

    A free of a key never allocated (or allocated with 0 bytes) is ignored: a trace may free storages it did
    not see allocated. The first OutOfMemory ends the replay and is reported in `oom`.
    """
    if isinstance(timeline_points, bool) or not isinstance(timeline_points, int) or timeline_points < 0:
        raise InputError(f"timeline_points must be a whole number >= 0, got {timeline_points!r}")
    al = CachingAllocator(config, capacity)
    live = al._live
    malloc, release = al._malloc, al._free
    phase = None
    tag_sums: dict = {}
    peak_tags: dict = {}
    tags_stale = False  # a new allocated peak whose per-tag copy is still to take (at the next free)
    best_a = best_r = 0
    a_event = r_event = None
    a_phase = r_phase = None
    a_reserved = r_allocated = r_reserved = r_segments = 0
    tl = timeline_points > 0
    points: list[tuple[int, int, int]] = []
    stride = 1
    oom = None
    i = -1
    for i, ev in enumerate(events):
        kind = ev[0]
        if kind == "alloc":
            try:
                _, key, nbytes, tag = ev
            except ValueError:
                raise InputError(f"event {i}: expected ('alloc', key, nbytes, tag), got {ev!r}") from None
            if nbytes.__class__ is not int or nbytes < 0:
                nbytes = _check_nbytes(nbytes)
            if nbytes:
                if key in live:
                    raise InputError(f"event {i}: key {key!r} is allocated again without a free in between")
                try:
                    b = malloc(key, nbytes)
                except OutOfMemory as e:
                    oom = {**e.as_dict(), "event": i, "key": key, "tag": tag, "phase": phase}
                    break
                b.tag = tag
                tag_sums[tag] = tag_sums.get(tag, 0) + b.size
                if al.allocated > best_a:
                    best_a, a_event, a_phase, a_reserved = al.allocated, i, phase, al.reserved
                    tags_stale = True
                if al.peak_reserved > best_r:
                    best_r, r_event, r_phase = al.peak_reserved, i, phase
                    r_allocated, r_reserved, r_segments = al.allocated, al.reserved, al.n_segments
        elif kind == "free":
            b = live.pop(ev[1], None)
            if b is not None:
                if tags_stale:  # every malloc raises allocated, so the peak holds until this first free
                    peak_tags = dict(tag_sums)
                    tags_stale = False
                tag_sums[b.tag] -= b.size
                release(b)
        elif kind == "phase":
            phase = ev[1]
        elif kind == "empty_cache":  # torch.cuda.empty_cache(): cached segments with no live block go back
            al.empty_cache()
        elif kind == "reset_peaks":  # torch.cuda.reset_peak_memory_stats(): peaks restart from the current values
            al.reset_peak_stats()
            best_a, a_event, a_phase, a_reserved = al.allocated, i, phase, al.reserved
            best_r, r_event, r_phase = al.reserved, i, phase
            r_allocated, r_reserved, r_segments = al.allocated, al.reserved, al.n_segments
            peak_tags, tags_stale = dict(tag_sums), False
        else:
            raise InputError(
                f"event {i}: unknown kind {kind!r}; expected 'alloc', 'free', 'phase', 'empty_cache' or 'reset_peaks'"
            )
        if tl and i % stride == 0:
            points.append((i, al.allocated, al.reserved))
            if len(points) >= 2 * timeline_points:  # keep every other point, sample half as often
                points = points[::2]
                stride *= 2
    if tags_stale:
        peak_tags = dict(tag_sums)
    n_events = i + 1
    timeline: list[tuple[int, int, int]] = []
    if tl and n_events:
        keep = {}
        if a_event is not None:
            keep[a_event] = (a_event, best_a, a_reserved)
        if r_event is not None:
            keep[r_event] = (r_event, r_allocated, r_reserved)
        if oom is None:
            points.append((i, al.allocated, al.reserved))
        timeline = _thin(points, keep, timeline_points)
    return Replay(
        peak_allocated=al.peak_allocated,
        peak_reserved=al.peak_reserved,
        allocated_at_peak_reserved=r_allocated,
        fragmentation_at_peak=r_reserved - r_allocated,
        peak_reserved_phase=r_phase,
        peak_allocated_phase=a_phase,
        live_by_tag_at_peak={t: v for t, v in peak_tags.items() if v},
        segments_at_peak=r_segments,
        n_events=n_events,
        oom=oom,
        timeline=timeline,
        peak_allocated_event=a_event,
        peak_reserved_event=r_event,
        alloc_retries=al.num_alloc_retries,
    )


def _thin(points: list, keep: dict, limit: int) -> list:
    """At most `limit` points, evenly spread, always with the peak points in `keep` (index -> point)."""
    rest = sorted({p[0]: p for p in points if p[0] not in keep}.values())
    room = max(limit - len(keep), 0)
    if len(rest) > room:
        if room > 1:
            rest = [rest[round(k * (len(rest) - 1) / (room - 1))] for k in range(room)]
        else:
            rest = rest[-1:] if room else []
    return sorted([*rest, *keep.values()])
