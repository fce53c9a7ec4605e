"""The caching-allocator model (qlora_bench/estimate/allocator.py) against values derived by hand from
PyTorch's c10/cuda/CUDACachingAllocator.cpp; config parsing against torch's own parser where it can run."""

import ctypes
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_bench.errors import InputError
from qlora_bench.estimate.allocator import (
    AllocatorConfig,
    CachingAllocator,
    OutOfMemory,
    Replay,
    replay,
    roundup_power2_next_division,
)

KiB, MiB = 1024, 1024**2


def layout(a: CachingAllocator):
    """[(segment size, [(offset, size, allocated), ...]), ...] by address."""
    return [(s.size, list(s.blocks)) for s in a.segments()]


# --------------------------------------------------------------------------- segments, best fit, splitting


def test_large_request_gets_a_20mib_segment():
    # 1.5 MiB > kSmallSize -> large pool; get_allocation_size: < kMinLargeAlloc (10 MiB) -> 20 MiB;
    # should_split: remaining 18.5 MiB > kSmallSize -> split, the request's block is exactly 1.5 MiB
    a = CachingAllocator()
    a.malloc("x", 3 * MiB // 2)
    assert (a.reserved, a.allocated) == (20 * MiB, 3 * MiB // 2)
    assert layout(a) == [(20 * MiB, [(0, 3 * MiB // 2, True), (3 * MiB // 2, 37 * MiB // 2, False)])]


def test_small_request_gets_its_own_2mib_segment_then_5mib_is_carved_from_the_remainder():
    a = CachingAllocator()
    a.malloc("x", 3 * MiB // 2)
    # 600 KiB <= kSmallSize -> small pool, which has nothing cached -> a 2 MiB (kSmallBuffer) segment, split
    # because the remainder (1448 KiB) >= kMinBlockSize
    a.malloc("s", 600 * KiB)
    assert a.reserved == 22 * MiB
    # 5 MiB: best fit in the large pool is the 18.5 MiB remainder -> split 5 + 13.5, no new segment
    a.malloc("y", 5 * MiB)
    assert a.reserved == 22 * MiB
    assert a.allocated == 3 * MiB // 2 + 600 * KiB + 5 * MiB
    assert layout(a) == [
        (20 * MiB, [(0, 3 * MiB // 2, True), (3 * MiB // 2, 5 * MiB, True), (13 * MiB // 2, 27 * MiB // 2, False)]),
        (2 * MiB, [(0, 600 * KiB, True), (600 * KiB, 2 * MiB - 600 * KiB, False)]),
    ]


def test_freed_neighbours_merge():
    a = CachingAllocator()
    a.malloc("x", 3 * MiB // 2)
    a.malloc("y", 5 * MiB)
    a.free("x")  # next to an allocated block: stays a 1.5 MiB free block
    assert layout(a) == [
        (20 * MiB, [(0, 3 * MiB // 2, False), (3 * MiB // 2, 5 * MiB, True), (13 * MiB // 2, 27 * MiB // 2, False)])
    ]
    a.free("y")  # free_block: try_merge_blocks with prev and next -> the whole segment is one free block
    assert layout(a) == [(20 * MiB, [(0, 20 * MiB, False)])]
    assert (a.allocated, a.reserved) == (0, 20 * MiB)


def test_best_fit_smallest_block_ties_by_address_and_unsplit_remainder_counts_as_allocated():
    a = CachingAllocator()
    # >= 10 MiB: segments of exactly 12, 14, 12 MiB (rounded to 2 MiB), created in this order
    for key, size in (("A", 12), ("B", 14), ("C", 12)):
        a.malloc(key, size * MiB)
    for key in "ABC":
        a.free(key)
    # 11 MiB: lower_bound on (size, address) -> the 12 MiB blocks come first, A's address before C's;
    # remainder 1 MiB is not > kSmallSize -> no split: the whole 12 MiB block is allocated
    a.malloc("r", 11 * MiB)
    assert (a.allocated, a.reserved) == (12 * MiB, 38 * MiB)
    assert layout(a) == [
        (12 * MiB, [(0, 12 * MiB, True)]),
        (14 * MiB, [(0, 14 * MiB, False)]),
        (12 * MiB, [(0, 12 * MiB, False)]),
    ]
    a.malloc("q", 23 * MiB // 2)  # the next smallest fit is C, not the 14 MiB B
    assert layout(a)[2] == (12 * MiB, [(0, 12 * MiB, True)])
    a.malloc("p", 21 * MiB // 2)  # B: remainder 3.5 MiB > 1 MiB -> split
    assert layout(a)[1] == (14 * MiB, [(0, 21 * MiB // 2, True), (21 * MiB // 2, 7 * MiB // 2, False)])


def test_round_size_and_allocation_size():
    a = CachingAllocator()
    assert [a.round_size(n) for n in (1, 511, 512, 513, 1200)] == [512, 512, 512, 1024, 1536]
    assert [a.allocation_size(s) for s in (512, MiB, MiB + 512, 10 * MiB - 512, 10 * MiB, 21 * MiB)] == [
        2 * MiB,
        2 * MiB,
        20 * MiB,
        20 * MiB,
        10 * MiB,
        22 * MiB,
    ]
    b = CachingAllocator(AllocatorConfig.parse("large_segment_size_mb:64"))
    assert b.allocation_size(2 * MiB) == 64 * MiB  # large_segment_size_mb replaces the 20 MiB kLargeBuffer


def test_zero_bytes_unknown_keys_and_bad_input():
    a = CachingAllocator()
    a.malloc("z", 0)  # NativeCachingAllocator::allocate: size 0 gets no block
    assert (a.allocated, a.reserved, a.segments()) == (0, 0, [])
    with pytest.raises(KeyError):
        a.free("z")
    a.malloc("x", 100)
    with pytest.raises(InputError, match="already allocated"):
        a.malloc("x", 100)
    for bad in (-1, 1.5, "10", True, None):
        with pytest.raises(InputError, match="nbytes"):
            a.malloc("y", bad)
    with pytest.raises(InputError, match="capacity"):
        CachingAllocator(capacity=0)
    with pytest.raises(InputError, match="capacity"):
        CachingAllocator(AllocatorConfig(per_process_memory_fraction=0.5))
    with pytest.raises(OutOfMemory, match="more than 1EB"):
        a.malloc("huge", 1 << 60)


# --------------------------------------------------------------------------- max_split_size


@pytest.mark.parametrize("rounding_mb, reserved_after_d", [(None, 200), (40, 130)])
def test_max_split_size_oversize_blocks(rounding_mb, reserved_after_d):
    text = "max_split_size_mb:40" + (f",max_non_split_rounding_mb:{rounding_mb}" if rounding_mb else "")
    a = CachingAllocator(AllocatorConfig.parse(text))
    a.malloc("a", 100 * MiB)  # a 100 MiB segment; 100 >= max_split -> never split
    a.free("a")
    # 30 MiB < max_split and the cached block is >= max_split: get_free_block refuses it -> new 30 MiB segment
    a.malloc("b", 30 * MiB)
    assert a.reserved == 130 * MiB
    # 90 MiB >= max_split: may take the 100 MiB block (100 < 90 + 20 MiB max_non_split_rounding), unsplit
    a.malloc("c", 90 * MiB)
    assert (a.allocated, a.reserved) == (130 * MiB, 130 * MiB)
    a.free("c")
    # 70 MiB: 100 >= 70 + 20 -> refused, new 70 MiB segment; with max_non_split_rounding_mb:40 100 < 110 -> taken
    a.malloc("d", 70 * MiB)
    assert a.reserved == reserved_after_d * MiB
    assert a.allocated == 30 * MiB + (70 if rounding_mb is None else 100) * MiB


# --------------------------------------------------------------------------- roundup_power2_divisions


def test_roundup_power2_next_division_worked_numbers():
    # the source's own example: 1200 lies in [1024, 2048); 4 divisions are 1024, 1280, 1536, 1792 -> 1280
    assert roundup_power2_next_division(1200, 4) == 1280
    # 5 MiB + 1: floor 4 MiB, step 4 MiB / 4 = 1 MiB -> 6 MiB
    assert roundup_power2_next_division(5 * MiB + 1, 4) == 6 * MiB
    # 100,000,000: floor 2^26 = 67,108,864, step 2^24 = 16,777,216; 100e6 & ~(2^24 - 1) = 5 * 2^24
    # = 83,886,080 -> + 2^24 = 100,663,296 (96 MiB)
    assert roundup_power2_next_division(100_000_000, 4) == 100_663_296
    # 3 MiB + 1 with 8 divisions: floor 2 MiB, step 256 KiB -> 3 MiB + 256 KiB
    assert roundup_power2_next_division(3 * MiB + 1, 8) == 3 * MiB + 256 * KiB
    assert roundup_power2_next_division(64 * MiB, 4) == 64 * MiB  # a power of 2 stays


def test_round_size_with_divisions():
    a = CachingAllocator(AllocatorConfig.parse("roundup_power2_divisions:4"))
    # round_size uses the divisions only when size > kMinBlockSize * divisions (2048): 1200 -> plain 1536
    assert a.round_size(1200) == 1536
    assert a.round_size(5 * MiB + 1) == 6 * MiB
    a.malloc("x", 5 * MiB + 1)
    assert a.allocated == 6 * MiB  # the block is the rounded size
    # list form: [256:4,>:2] -> 4 divisions up to the [256, 512) MiB interval, 2 above it
    b = CachingAllocator(AllocatorConfig.parse("roundup_power2_divisions:[256:4,>:2]"))
    assert b.round_size(300 * MiB) == 320 * MiB  # floor 256 MiB, step 64 MiB
    assert b.round_size(600 * MiB) == 768 * MiB  # floor 512 MiB, step 256 MiB
    assert b.round_size(3 * MiB) == 3 * MiB  # 3 MiB is already a 512 KiB (2 MiB / 4) step


def _libc10_divisions():
    """torch 2.13's own AcceleratorAllocatorConfig::roundup_power2_divisions(size), via libc10.so."""
    torch = pytest.importorskip("torch")
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
        fn = lib._ZN3c1016CachingAllocator26AcceleratorAllocatorConfig24roundup_power2_divisionsEm
    except (OSError, AttributeError):
        pytest.skip("libc10.so does not export roundup_power2_divisions(size_t)")
    if setter is None:
        pytest.skip("torch has no _accelerator_setAllocatorSettings")
    fn.restype, fn.argtypes = ctypes.c_size_t, [ctypes.c_size_t]
    return setter, fn


@pytest.mark.parametrize(
    "text",
    [
        "roundup_power2_divisions:[64:8,128:2,256:4,512:2,1024:4,>:1]",
        "roundup_power2_divisions:[256:4,>:2]",
        "roundup_power2_divisions:[>:4]",
        "roundup_power2_divisions:[128:8,64:2]",
        "roundup_power2_divisions:[1:2,2:4]",
        "roundup_power2_divisions:[131072:8]",
        "roundup_power2_divisions:16",
        "roundup_power2_divisions:[]",
    ],
)
def test_divisions_table_matches_torch(text):
    setter, fn = _libc10_divisions()
    setter(text)
    try:
        ours = AllocatorConfig.parse(text)
        for k in range(16, 40):
            for size in (1 << k, 3 << (k - 1)):
                assert ours.divisions(size) == fn(size), (text, size)
        again = AllocatorConfig.parse(ours.to_text())  # the canonical text builds the same table
        assert again == ours
        if ours.to_text():
            setter(ours.to_text())
            assert all(ours.divisions(1 << k) == fn(1 << k) for k in range(16, 40))
    finally:
        setter("")


# --------------------------------------------------------------------------- garbage collection


GC = "garbage_collection_threshold:0.6,per_process_memory_fraction:0.5"


@pytest.mark.parametrize(
    "text, reserved_mb, cached_mb",
    [
        # allowed = round(0.5 x 1000 MiB) = 500 MiB, gc threshold = 0.6 x 500 = 300 MiB.
        # Large-pool get_free_block calls: a(1) b(2); a cached at count 2; c(3) misses, reserved 200 <= 300 -> no
        # gc, new segment -> 350; b cached at 3; d(4) misses, 350 > 300 -> gc, target 50 MiB: ages a = 4-2 = 2,
        # b = 4-3 = 1, average 1.5 -> only a (age >= average) is freed: 250, then d's segment -> 400, b stays cached
        (GC, 400, [100]),
        # no threshold: nothing collected; 350 + 150 = 500 <= allowed 500 -> 500 MiB reserved
        ("per_process_memory_fraction:0.5", 500, [100, 100]),
        # a threshold without a memory fraction does nothing in torch (gc needs allowed_memory_maximum)
        ("garbage_collection_threshold:0.6", 500, [100, 100]),
    ],
)
def test_garbage_collection_frees_aged_cached_blocks(text, reserved_mb, cached_mb):
    a = CachingAllocator(AllocatorConfig.parse(text), capacity=1000 * MiB)
    a.malloc("a", 100 * MiB)
    a.malloc("b", 100 * MiB)
    a.free("a")
    a.malloc("c", 150 * MiB)
    a.free("b")
    a.malloc("d", 150 * MiB)
    assert a.reserved == reserved_mb * MiB
    assert [s.size // MiB for s in a.segments() if not s.blocks[0][2]] == cached_mb


def test_memory_fraction_limits_reserved():
    # allowed = 500 MiB: a cudaMalloc past it fails like a full device, after releasing the cache
    a = CachingAllocator(AllocatorConfig.parse("per_process_memory_fraction:0.5"), capacity=1000 * MiB)
    a.malloc("a", 400 * MiB)
    with pytest.raises(OutOfMemory) as e:
        a.malloc("b", 200 * MiB)
    assert e.value.allowed == 500 * MiB and "500.00 MiB allowed; " in str(e.value)


# --------------------------------------------------------------------------- out of memory


def test_oom_path_releases_the_cache_and_retries_then_raises_with_the_numbers():
    a = CachingAllocator(capacity=100 * MiB)
    a.malloc("a", 60 * MiB)
    a.free("a")  # 60 MiB cached
    # 70 MiB: no cached block fits; cudaMalloc fails (60 + 70 > 100); release_available_cached_blocks does
    # nothing without max_split_size; release_cached_blocks frees the 60 MiB; the retry succeeds
    a.malloc("b", 70 * MiB)
    assert (a.reserved, a.allocated, a.num_alloc_retries) == (70 * MiB, 70 * MiB, 1)
    # 40 MiB: 70 + 40 > 100 and nothing to release -> OutOfMemory
    with pytest.raises(OutOfMemory) as e:
        a.malloc("c", 40 * MiB)
    oom = e.value
    assert (oom.tried_to_allocate, oom.allocated, oom.reserved, oom.capacity, oom.free) == (
        40 * MiB,
        70 * MiB,
        70 * MiB,
        100 * MiB,
        30 * MiB,
    )
    assert str(oom).startswith(
        "CUDA out of memory. Tried to allocate 40.00 MiB. GPU 0 has a total capacity of 100.00 MiB of which "
        "30.00 MiB is free. Of the allocated memory 70.00 MiB is allocated by PyTorch, and 0 bytes is reserved "
        "by PyTorch but unallocated."
    )
    assert a.num_ooms == 1


def test_oom_message_reports_the_segment_size_not_the_request():
    a = CachingAllocator(capacity=100 * MiB)
    a.malloc("a", 90 * MiB)
    with pytest.raises(OutOfMemory) as e:
        a.malloc("b", 3 * MiB // 2)  # needs a 20 MiB segment: torch prints get_allocation_size
    assert e.value.requested == 3 * MiB // 2 and e.value.tried_to_allocate == 20 * MiB
    assert "Tried to allocate 20.00 MiB" in str(e.value)
    assert e.value.as_dict()["reserved_unallocated"] == 0


def test_release_available_cached_blocks_frees_only_enough_oversize_blocks():
    cfg = AllocatorConfig.parse("max_split_size_mb:40")
    a = CachingAllocator(cfg, capacity=200 * MiB)
    a.malloc("x", 30 * MiB)
    a.malloc("a", 100 * MiB)
    a.malloc("b", 50 * MiB)
    a.free("a")
    a.free("b")  # cached: 100 and 50 MiB, both >= max_split
    # 75 MiB: get_free_block refuses the 100 MiB block (100 >= 75 + 20); cudaMalloc of 76 MiB (2 MiB rounding)
    # fails (180 + 76 > 200); release_available_cached_blocks: lower_bound(max(75, 40)) = the 100 MiB block ->
    # only it is freed; the retry succeeds: 30 + 50 + 76 = 156 MiB, the 50 MiB block stays cached
    a.malloc("c", 75 * MiB)
    assert a.reserved == 156 * MiB
    assert sorted(s.size // MiB for s in a.segments()) == [30, 50, 76]


def test_release_available_cached_blocks_frees_largest_first_when_none_is_big_enough():
    a = CachingAllocator(AllocatorConfig.parse("max_split_size_mb:40"), capacity=200 * MiB)
    a.malloc("a", 100 * MiB)
    a.malloc("b", 50 * MiB)
    a.free("a")
    a.free("b")
    # 120 MiB: nothing >= 120 cached -> free from the largest down until >= 120: 100, then 50 -> retry: 120
    a.malloc("c", 120 * MiB)
    assert a.reserved == 120 * MiB and a.num_alloc_retries == 0


def test_throw_on_cudamalloc_oom_rejects_without_releasing_the_cache():
    for text, ok in (("", True), ("throw_on_cudamalloc_oom:True", False)):
        a = CachingAllocator(AllocatorConfig.parse(text), capacity=100 * MiB)
        a.malloc("a", 60 * MiB)
        a.free("a")
        if ok:
            a.malloc("b", 70 * MiB)
            assert a.reserved == 70 * MiB
        else:  # alloc_block: 60 + 70 > 1.0 x 100 -> rejected; malloc skips the release-and-retry chain
            with pytest.raises(OutOfMemory, match="preemptively rejected") as e:
                a.malloc("b", 70 * MiB)
            assert e.value.rejected and a.reserved == 60 * MiB


# --------------------------------------------------------------------------- expandable segments


EXP = AllocatorConfig(expandable_segments=True)


def test_expandable_segments_grow_in_pages():
    a = CachingAllocator(EXP)
    # 1 MiB + 512 -> large pool; one segment per pool, mapped in large_segment_size (20 MiB) pages
    a.malloc("x", MiB + 1)
    assert (a.reserved, a.allocated) == (20 * MiB, MiB + 512)
    a.malloc("s", 600 * KiB)  # small pool: its own segment, 2 MiB (kSmallBuffer) pages
    assert a.reserved == 22 * MiB
    # 25 MiB: no free block that big; the free tail (20 MiB - 1 MiB - 512) sits before the unmapped space ->
    # map one more 20 MiB page behind it, merged: 39 MiB - 512 -> split 25 + rest
    a.malloc("y", 25 * MiB)
    assert a.reserved == 42 * MiB
    assert layout(a)[0] == (
        40 * MiB,
        [(0, MiB + 512, True), (MiB + 512, 25 * MiB, True), (26 * MiB + 512, 14 * MiB - 512, False)],
    )
    for k in "xsy":
        a.free(k)
    assert a.reserved == 42 * MiB  # frees never unmap
    a.empty_cache()  # release_cached_blocks -> unmap_block -> release_expandable_segment
    assert (a.reserved, a.segments(), a.n_segments) == (0, [], 0)


def test_expandable_segments_remove_the_fragmentation_of_the_default_allocator():
    def run(cfg):
        a = CachingAllocator(cfg)
        a.malloc("A", 50 * MiB)
        a.free("A")
        a.malloc("B", 30 * MiB)
        a.malloc("C", 30 * MiB)
        return a.reserved, a.allocated

    # default: B splits the cached 50 MiB segment (30 + 20); C fits nowhere -> a new 30 MiB segment
    assert run(AllocatorConfig()) == (80 * MiB, 60 * MiB)
    # expandable: A mapped 3 x 20 MiB pages; B and C tile them exactly: reserved == allocated
    assert run(EXP) == (60 * MiB, 60 * MiB)


def test_expandable_best_fit_prefers_a_block_that_need_not_grow():
    a = CachingAllocator(EXP)
    a.malloc("A", 30 * MiB)  # 2 pages: A + 10 MiB tail
    a.malloc("B", 20 * MiB)  # tail grows by a page: B at 30, 10 MiB tail
    a.malloc("C", 15 * MiB)  # again: C at 50, 15 MiB tail at 65
    a.free("A")  # 30 MiB free at 0, before B
    # 14 MiB: lower_bound finds the 15 MiB tail first, but its size counts as 15 MiB + the unmapped space
    # behind it; get_free_block walks on to A's 30 MiB block, which can grow no further: split at offset 0
    a.malloc("D", 14 * MiB)
    assert layout(a)[0][1][:2] == [(0, 14 * MiB, True), (14 * MiB, 16 * MiB, False)]
    assert a.reserved == 80 * MiB


def test_expandable_oom_path_unmaps_free_pages_and_maps_at_the_lowest_address_with_room():
    # capacity 160 MiB: the segment reserves 9/8 x 160 = 180 MiB of addresses (9 pages of 20 MiB)
    a = CachingAllocator(EXP, capacity=160 * MiB)
    a.malloc("a", 60 * MiB)  # pages 0-2
    a.malloc("b", 20 * MiB)  # page 3
    a.free("a")
    # 90 MiB: mapping 5 more pages fails (80 + 100 > 160); release_cached_blocks unmaps a's 3 free pages
    # (reserved 20); the retry: the hole at 0 is only 60 MiB (b follows), so 5 pages after b are mapped
    a.malloc("c", 90 * MiB)
    assert (a.reserved, a.allocated) == (120 * MiB, 110 * MiB)
    assert layout(a) == [(120 * MiB, [(0, 20 * MiB, True), (20 * MiB, 90 * MiB, True), (110 * MiB, 10 * MiB, False)])]
    assert a.segments()[0].is_expandable and a.n_segments == 1


def test_expandable_segment_address_space_is_9_8_of_the_device():
    # capacity 100 MiB -> 112.5 MiB of addresses, rounded up to 6 pages = 120 MiB; after b (60-80 MiB) the tail
    # holds 40 MiB only: find_expandable_block creates a second segment for a 70 MiB request
    a = CachingAllocator(EXP, capacity=100 * MiB)
    a.malloc("a", 60 * MiB)
    a.malloc("b", 20 * MiB)
    a.free("a")
    a.malloc("c", 70 * MiB)
    assert (a.reserved, a.allocated, a.n_segments) == (100 * MiB, 90 * MiB, 2)
    assert layout(a) == [
        (20 * MiB, [(0, 20 * MiB, True)]),
        (80 * MiB, [(0, 70 * MiB, True), (70 * MiB, 10 * MiB, False)]),
    ]
    with pytest.raises(OutOfMemory):  # a request above the reserved address space can never be mapped
        CachingAllocator(EXP, capacity=100 * MiB).malloc("x", 121 * MiB)


def test_expandable_failed_map_leaves_no_memory_behind():
    a = CachingAllocator(EXP, capacity=20 * MiB)
    a.malloc("big", 20 * MiB)  # the whole device, one large page
    with pytest.raises(OutOfMemory):  # a small-pool segment is created, but its first 2 MiB page cannot map
        a.malloc("s", KiB)
    assert (a.reserved, a.n_segments) == (20 * MiB, 1)
    a.free("big")
    a.empty_cache()
    assert (a.reserved, a.segments(), a.n_segments) == (0, [], 0)
    a.malloc("s", KiB)  # the small segment's address space is reused
    assert (a.reserved, a.n_segments) == (2 * MiB, 1)


# --------------------------------------------------------------------------- config text


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("", ""),
        ("   ", ""),
        (
            "expandable_segments:True,max_split_size_mb:256,garbage_collection_threshold:0.8,roundup_power2_divisions:4",
            "max_split_size_mb:256,garbage_collection_threshold:0.8,roundup_power2_divisions:4,expandable_segments:True",
        ),
        (
            "roundup_power2_divisions:[64:8,128:2,256:4,512:2,1024:4,>:1]",
            "roundup_power2_divisions:[64:8,128:2,256:4,512:2,1024:4,>:1]",
        ),
        ("roundup_power2_divisions:[>:4]", "roundup_power2_divisions:[1:0,>:4]"),
        (" max_split_size_mb : 128 , expandable_segments : False ", "max_split_size_mb:128"),
        (
            "large_segment_size_mb:64,max_split_size_mb:64,max_non_split_rounding_mb:64",
            "large_segment_size_mb:64,max_split_size_mb:64",
        ),
        (
            "max_non_split_rounding_mb:30,per_process_memory_fraction:0.9,throw_on_cudamalloc_oom:True",
            "max_non_split_rounding_mb:30,per_process_memory_fraction:0.9,throw_on_cudamalloc_oom:True",
        ),
        (
            "pinned_use_cuda_host_register:True,release_lock_on_cudamalloc:True,backend:native,"
            "pinned_num_register_threads:8,graph_capture_record_stream_reuse:False,pinned_use_background_threads:True",
            "",
        ),
        ("max_split_size_mb:100,max_split_size_mb:200", "max_split_size_mb:200"),  # the last one wins
        ("roundup_power2_divisions:0x", None),
    ],
)
def test_config_round_trips(text, canonical):
    if canonical is None:
        with pytest.raises(InputError):
            AllocatorConfig.parse(text)
        return
    cfg = AllocatorConfig.parse(text)
    assert cfg.to_text() == canonical
    assert AllocatorConfig.parse(cfg.to_text()) == cfg


def test_config_fields():
    cfg = AllocatorConfig.parse("expandable_segments:True,max_split_size_mb:256,garbage_collection_threshold:0.8")
    assert (cfg.max_split_size, cfg.expandable_segments, cfg.garbage_collection_threshold) == (256 * MiB, True, 0.8)
    assert AllocatorConfig.parse("") == AllocatorConfig()
    assert AllocatorConfig(roundup_power2_divisions=4).roundup_power2_divisions == (4,) * 16
    assert AllocatorConfig(roundup_power2_divisions=0) == AllocatorConfig()
    with pytest.raises(InputError, match="max_split_size"):
        AllocatorConfig(max_split_size=10 * MiB)
    with pytest.raises(InputError, match="roundup_power2_divisions"):
        AllocatorConfig(roundup_power2_divisions=3)


@pytest.mark.parametrize(
    "text, names",
    [
        ("max_split_size_mb:19", "max_split_size_mb:19 is too small; torch requires >= 20"),
        ("max_split_size_mb:abc", "max_split_size_mb:abc is not a whole number"),
        ("max_split_size_mb:-5", "max_split_size_mb"),
        ("max_split_size_mb:[1]", "max_split_size_mb takes a single value"),
        ("large_segment_size_mb:64,max_split_size_mb:40", "max_split_size_mb:40 is too small; torch requires >= 64"),
        ("large_segment_size_mb:10", "large_segment_size_mb:10 must be > 10"),
        ("max_non_split_rounding_mb:19", "max_non_split_rounding_mb"),
        ("garbage_collection_threshold:1", "garbage_collection_threshold:1 must be between 0 and 1"),
        ("garbage_collection_threshold:0", "garbage_collection_threshold"),
        ("garbage_collection_threshold:nan", "garbage_collection_threshold"),
        ("roundup_power2_divisions:3", "roundup_power2_divisions:3 must be a power of 2"),
        ("roundup_power2_divisions:0", "roundup_power2_divisions"),
        ("roundup_power2_divisions:[64:3]", "divisions 3 must be 0 or a power of 2"),
        ("roundup_power2_divisions:[63:4]", "interval '63' must be a power of 2"),
        ("roundup_power2_divisions:[64:8", "has no closing ']'"),
        ("roundup_power2_divisions:[64:8,]", "trailing ','"),
        ("expandable_segments:true", "expandable_segments:true must be True or False"),
        ("expandable_segments", "'expandable_segments' needs a value"),
        ("expandable_segments:True,", "trailing ','"),
        ("expandable_segments:True max_split_size_mb:30", "expandable_segments:Truemax_split_size_mb"),
        ("backend:cudaMallocAsync", "backend:cudaMallocAsync is not modelled"),
        ("backend:foo", "backend:foo is unknown"),
        ("max_spilt_size_mb:128", "unknown key 'max_spilt_size_mb'; did you mean 'max_split_size_mb'?"),
        ("per_process_memory_fraction:1.5", "per_process_memory_fraction"),
        ("pinned_num_register_threads:3", "pinned_num_register_threads:3 must be a power of 2"),
        (",expandable_segments:True", "expected a key at the start"),
    ],
)
def test_bad_config_text_is_one_line_naming_the_key(text, names):
    with pytest.raises(InputError) as e:
        AllocatorConfig.parse(text)
    msg = str(e.value)
    assert names in msg and "\n" not in msg and msg.startswith("PYTORCH_CUDA_ALLOC_CONF: ")


@pytest.mark.parametrize(
    "text",
    [
        "max_split_size_mb:19",
        "max_split_size_mb:20",
        "large_segment_size_mb:10",
        "large_segment_size_mb:11",
        "large_segment_size_mb:64,max_split_size_mb:40",
        "garbage_collection_threshold:1",
        "garbage_collection_threshold:0.5",
        "roundup_power2_divisions:3",
        "roundup_power2_divisions:[64:8,>:1]",
        "roundup_power2_divisions:[64:3]",
        "roundup_power2_divisions:[63:4]",
        "expandable_segments:true",
        "expandable_segments:True",
        "max_split_size_mb:abc",
        "roundup_power2_divisions:0",
        "max_non_split_rounding_mb:19",
        "pinned_use_background_threads:True",
    ],
)
def test_accepts_and_refuses_like_torch(text):
    torch = pytest.importorskip("torch")
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        pytest.skip("torch has no _accelerator_setAllocatorSettings")
    try:
        setter("large_segment_size_mb:20")  # torch keeps large_segment_size across calls
        try:
            setter(text)
            torch_ok = True
        except (ValueError, RuntimeError):
            torch_ok = False
    finally:
        setter("large_segment_size_mb:20")
        setter("")
    try:
        AllocatorConfig.parse(text)
        ours_ok = True
    except InputError:
        ours_ok = False
    assert ours_ok == torch_ok


# --------------------------------------------------------------------------- replay


def test_replay_phases_tags_and_peaks():
    events = [
        ("phase", "forward"),
        ("alloc", "a", 3 * MiB // 2, "activations"),  # 20 MiB segment
        ("alloc", "w", 600 * KiB, "weights"),  # 2 MiB small segment
        ("free", "never-allocated"),  # ignored
        ("alloc", "z", 0, "weights"),  # ignored
        ("phase", "backward"),
        ("free", "a"),
        ("alloc", "g", 30 * MiB, "gradients"),  # the 20 MiB free block is too small: a 30 MiB segment
        ("free", "g"),
        ("free", "z"),  # never got a block: ignored
    ]
    r = replay(events)
    assert r.n_events == len(events) and r.oom is None
    assert r.peak_allocated == 30 * MiB + 600 * KiB
    assert r.peak_reserved == 52 * MiB
    assert r.allocated_at_peak_reserved == 30 * MiB + 600 * KiB
    assert r.fragmentation_at_peak == 52 * MiB - 30 * MiB - 600 * KiB
    assert (r.peak_reserved_phase, r.peak_allocated_phase) == ("backward", "backward")
    assert (r.peak_allocated_event, r.peak_reserved_event) == (7, 7)
    assert r.live_by_tag_at_peak == {"weights": 600 * KiB, "gradients": 30 * MiB}
    assert r.segments_at_peak == 3
    assert r.timeline == []


def test_replay_stops_at_the_first_oom():
    events = [("phase", "load"), ("alloc", 1, 60 * MiB, "w"), ("alloc", 2, 60 * MiB, "w"), ("alloc", 3, MiB, "w")]
    r = replay(events, capacity=100 * MiB)
    assert r.n_events == 3
    assert r.oom["event"] == 2 and r.oom["tag"] == "w" and r.oom["phase"] == "load"
    assert (r.oom["tried_to_allocate"], r.oom["allocated"], r.oom["reserved"], r.oom["capacity"]) == (
        60 * MiB,
        60 * MiB,
        60 * MiB,
        100 * MiB,
    )
    assert r.peak_allocated == 60 * MiB


def test_replay_bad_events():
    with pytest.raises(InputError, match="unknown kind"):
        replay([("malloc", 1, 10, "x")])
    with pytest.raises(InputError, match="allocated again"):
        replay([("alloc", 1, 10, "x"), ("alloc", 1, 10, "x")])
    with pytest.raises(InputError, match="nbytes"):
        replay([("alloc", 1, -10, "x")])
    with pytest.raises(InputError, match="expected \\('alloc'"):
        replay([("alloc", 1, 10)])


def test_replay_timeline_is_bounded_and_keeps_the_peaks():
    events = []
    for i in range(500):  # a saw tooth: the allocated peak is at event 399 (the 200th alloc of the 2nd tooth)
        events.append(("alloc", i, (i % 250 + 1) * MiB // 4, "t"))
        if i % 250 == 249:
            events += [("free", j) for j in range(i - 249, i + 1)]
    r = replay(events, timeline_points=20)
    assert 0 < len(r.timeline) <= 20
    idx = [p[0] for p in r.timeline]
    assert idx == sorted(set(idx))
    assert r.peak_allocated_event in idx and r.peak_reserved_event in idx
    assert max(p[1] for p in r.timeline) == r.peak_allocated
    assert max(p[2] for p in r.timeline) == r.peak_reserved
    assert all(p[2] >= p[1] for p in r.timeline)


# --------------------------------------------------------------------------- properties

SIZES = st.one_of(
    st.integers(1, 2 * MiB),  # small and 1-2 MiB requests
    st.integers(MiB, 12 * MiB),  # the 20 MiB-segment range
    st.integers(10 * MiB, 90 * MiB),  # own segments
)
OPS = st.lists(st.tuples(st.booleans(), SIZES, st.integers(0, 10**6)), max_size=50)
CONFIGS = st.sampled_from(
    [
        ("", None),
        ("expandable_segments:True", None),
        ("max_split_size_mb:40,roundup_power2_divisions:[2:4,>:2]", None),
        ("", 200 * MiB),
        ("expandable_segments:True", 200 * MiB),
        ("max_split_size_mb:20,max_non_split_rounding_mb:30", 250 * MiB),
        ("garbage_collection_threshold:0.5,per_process_memory_fraction:0.8", 300 * MiB),
        ("expandable_segments:True,garbage_collection_threshold:0.5,per_process_memory_fraction:0.8", 300 * MiB),
    ]
)
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_invariants(a: CachingAllocator):
    segs = a.segments()
    assert a.reserved >= a.allocated >= 0
    assert a.peak_reserved >= a.reserved and a.peak_allocated >= a.allocated
    assert sum(s.size for s in segs) == a.reserved
    assert sum(size for s in segs for _, size, used in s.blocks if used) == a.allocated
    assert a.reserved % (2 * MiB) == 0  # segments and pages are multiples of 2 MiB
    if a.capacity is not None:
        assert a.reserved <= a.capacity
    for s in segs:
        offsets = [0]
        for off, size, _ in s.blocks:
            assert off == offsets[-1]
            offsets.append(off + size)
        assert offsets[-1] == s.size
        used = [u for _, _, u in s.blocks]
        assert not any(not x and not y for x, y in zip(used, used[1:]))  # free neighbours always merged


@PROPS
@given(CONFIGS, OPS)
def test_properties_of_random_sequences(conf, ops):
    text, capacity = conf
    a = CachingAllocator(AllocatorConfig.parse(text), capacity)
    live = []
    for n, (is_alloc, size, pick) in enumerate(ops):
        if is_alloc or not live:
            try:
                a.malloc(n, size)
                live.append(n)
            except OutOfMemory:
                assert capacity is not None
                if not a.config.expandable_segments:  # release_cached_blocks ran: no whole segment is cached
                    assert all(any(used for _, _, used in s.blocks) for s in a.segments())
        else:
            a.free(live.pop(pick % len(live)))
        check_invariants(a)
    assert a.peak_reserved >= a.peak_allocated
    for k in live:
        a.free(k)
    assert a.allocated == 0
    a.empty_cache()
    assert (a.reserved, a.segments(), a.n_segments) == (0, [], 0)


@PROPS
@given(CONFIGS, OPS, st.integers(0, 3))
def test_replay_properties(conf, ops, tags):
    text, capacity = conf
    events, live = [], []
    for n, (is_alloc, size, pick) in enumerate(ops):
        if n % 7 == 0:
            events.append(("phase", f"p{n}"))
        if is_alloc or not live:
            events.append(("alloc", n, size, f"t{n % (tags + 1)}"))
            live.append(n)
        else:
            events.append(("free", live.pop(pick % len(live))))
    cfg = AllocatorConfig.parse(text)
    r = replay(events, cfg, capacity, timeline_points=8)
    assert r == replay(events, cfg, capacity, timeline_points=8)  # deterministic
    assert isinstance(r, Replay) and r.peak_reserved >= r.peak_allocated
    assert r.allocated_at_peak_reserved + r.fragmentation_at_peak <= r.peak_reserved
    assert len(r.timeline) <= 8 and [p[0] for p in r.timeline] == sorted({p[0] for p in r.timeline})
    if r.peak_allocated_event is None:
        return
    # live_by_tag_at_peak, by brute force: replay up to the peak event and sum the live blocks by tag
    a = CachingAllocator(cfg, capacity)
    tag_of = {}
    for ev in events[: r.peak_allocated_event + 1]:
        if ev[0] == "alloc":
            a.malloc(ev[1], ev[2])
            tag_of[ev[1]] = ev[3]
        elif ev[0] == "free":
            a.free(ev[1])
    assert a.allocated == r.peak_allocated
    by_tag: dict = {}
    for key, block in a._live.items():
        by_tag[tag_of[key]] = by_tag.get(tag_of[key], 0) + block.size
    assert by_tag == r.live_by_tag_at_peak
