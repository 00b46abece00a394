"""Extent allocator: alignment, fits, splitting, coalescing, exhaustion, frees checked against
free space, and a randomized check that allocations and free extents always tile the arena.

The allocator keeps no record of allocations: each test keeps its own (offset -> size)."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_kv.core.allocator import ExtentAllocator
from trio_kv.core.audit import arena_problems

ALIGN = 4096


def check_invariants(allocator: ExtentAllocator, allocations: dict[int, int]) -> None:
    """Allocations never overlap, stay inside the arena, add up to ``used``, and together
    with the (coalesced) free extents cover the arena with no gap."""
    assert arena_problems(allocator, allocations) == []
    assert allocator.free_bytes == sum(size for _, size in allocator.free_extents())


def allocate_all(allocator: ExtentAllocator, sizes) -> dict[int, int]:
    """Allocate each size; offset -> size taken."""
    allocations = {}
    for nbytes in sizes:
        offset = allocator.allocate(nbytes)
        assert offset is not None
        allocations[offset] = allocator.rounded(nbytes)
    return allocations


def test_new_allocator_is_one_free_extent():
    allocator = ExtentAllocator(4 * ALIGN)
    assert allocator.free_extents() == [(0, 4 * ALIGN)]
    assert allocator.used == 0 and allocator.free_bytes == 4 * ALIGN


def test_capacity_is_rounded_down_to_the_alignment():
    assert ExtentAllocator(3 * ALIGN + 100).capacity == 3 * ALIGN


@pytest.mark.parametrize("alignment", [0, -4096, 3, 4095, 6000])
def test_alignment_must_be_a_power_of_two(alignment):
    with pytest.raises(ValueError):
        ExtentAllocator(1 << 20, alignment=alignment)


@pytest.mark.parametrize("nbytes", [0, 1, 100, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN - 5])
def test_allocations_are_aligned_and_rounded_up(nbytes):
    allocator = ExtentAllocator(16 * ALIGN)
    first = allocator.allocate(nbytes)
    second = allocator.allocate(nbytes)
    expected = max(1, -(-nbytes // ALIGN)) * ALIGN
    assert (first, second) == (0, expected)
    assert allocator.used == 2 * expected
    check_invariants(allocator, {first: expected, second: expected})


def test_small_alignment_is_respected():
    allocator = ExtentAllocator(1024, alignment=64)
    offsets = [allocator.allocate(n) for n in (1, 63, 64, 65)]
    assert offsets == [0, 64, 128, 192]
    assert allocator.free_extents() == [(320, 1024 - 320)]  # 65 bytes took 128


def test_exact_fit_fills_the_arena():
    allocator = ExtentAllocator(4 * ALIGN)
    assert allocator.allocate(4 * ALIGN) == 0
    assert allocator.free_extents() == []
    assert allocator.free_bytes == 0


def test_allocation_splits_a_larger_extent():
    allocator = ExtentAllocator(4 * ALIGN)
    assert allocator.allocate(ALIGN) == 0
    assert allocator.free_extents() == [(ALIGN, 3 * ALIGN)]


def test_exact_fit_hole_is_reused():
    allocator = ExtentAllocator(8 * ALIGN)
    allocations = allocate_all(allocator, [ALIGN] * 4)
    allocator.free(ALIGN, ALIGN)
    assert allocator.allocate(ALIGN) == ALIGN
    check_invariants(allocator, allocations)


def test_first_fit_skips_holes_that_are_too_small():
    allocator = ExtentAllocator(8 * ALIGN)
    allocations = allocate_all(allocator, [ALIGN] * 3)
    allocator.free(0, allocations.pop(0))  # a one-page hole at 0
    assert allocator.allocate(2 * ALIGN) == 3 * ALIGN
    check_invariants(allocator, {**allocations, 3 * ALIGN: 2 * ALIGN})


def test_full_arena_returns_none():
    allocator = ExtentAllocator(2 * ALIGN)
    allocator.allocate(ALIGN)
    allocator.allocate(ALIGN)
    assert allocator.allocate(1) is None
    assert allocator.used == 2 * ALIGN


def test_request_larger_than_any_free_extent_returns_none():
    allocator = ExtentAllocator(4 * ALIGN)
    allocations = allocate_all(allocator, [ALIGN] * 4)
    allocator.free(0, allocations.pop(0))
    allocator.free(2 * ALIGN, allocations.pop(2 * ALIGN))  # two free pages, not adjacent
    assert allocator.free_bytes == 2 * ALIGN
    assert allocator.largest_free() == ALIGN
    assert allocator.allocate(2 * ALIGN) is None
    check_invariants(allocator, allocations)


def test_request_larger_than_capacity_returns_none():
    assert ExtentAllocator(4 * ALIGN).allocate(4 * ALIGN + 1) is None


def test_zero_capacity_allocates_nothing():
    allocator = ExtentAllocator(100)
    assert allocator.capacity == 0
    assert allocator.allocate(1) is None
    assert allocator.free_extents() == []


def test_free_returns_the_bytes_freed():
    allocator = ExtentAllocator(4 * ALIGN)
    offset = allocator.allocate(ALIGN + 1)
    assert allocator.free(offset, ALIGN + 1) == 2 * ALIGN
    assert allocator.used == 0


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))), ids=str)
def test_frees_in_any_order_coalesce_back_to_one_extent(order):
    allocator = ExtentAllocator(4 * ALIGN)
    allocations = allocate_all(allocator, [ALIGN] * 4)
    offsets = sorted(allocations)
    for index in order:
        allocator.free(offsets[index], allocations.pop(offsets[index]))
        check_invariants(allocator, allocations)
    assert allocator.free_extents() == [(0, 4 * ALIGN)]
    assert allocator.used == 0


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
def test_frees_of_mixed_sizes_with_a_free_tail_coalesce_back_to_one_extent(order):
    allocator = ExtentAllocator(10 * ALIGN)
    allocations = allocate_all(allocator, [n * ALIGN for n in (1, 3, 2)])
    offsets = sorted(allocations)
    for index in order:
        allocator.free(offsets[index], allocations.pop(offsets[index]))
        check_invariants(allocator, allocations)
    assert allocator.free_extents() == [(0, 10 * ALIGN)]


def test_double_free_raises_and_changes_nothing():
    allocator = ExtentAllocator(4 * ALIGN)
    offset = allocator.allocate(ALIGN)
    allocator.free(offset, ALIGN)
    with pytest.raises(ValueError):
        allocator.free(offset, ALIGN)
    assert allocator.used == 0
    check_invariants(allocator, {})


def test_free_with_a_size_reaching_into_free_space_raises():
    allocator = ExtentAllocator(4 * ALIGN)
    allocator.allocate(2 * ALIGN)
    with pytest.raises(ValueError):
        allocator.free(ALIGN, 2 * ALIGN)  # its second page is free
    with pytest.raises(ValueError):
        allocator.free(0, 3 * ALIGN)
    assert allocator.used == 2 * ALIGN
    check_invariants(allocator, {0: 2 * ALIGN})


def test_free_of_a_page_inside_a_larger_free_extent_raises():
    allocator = ExtentAllocator(4 * ALIGN)
    allocations = allocate_all(allocator, [ALIGN] * 4)
    allocator.free(ALIGN, allocations.pop(ALIGN))
    allocator.free(2 * ALIGN, allocations.pop(2 * ALIGN))  # coalesced: pages 1-2 free
    with pytest.raises(ValueError):
        allocator.free(2 * ALIGN, ALIGN)
    check_invariants(allocator, allocations)


def test_free_of_a_never_allocated_offset_raises():
    with pytest.raises(ValueError):
        ExtentAllocator(4 * ALIGN).free(0, ALIGN)


@pytest.mark.parametrize("offset", [-ALIGN, 1, ALIGN // 2, 4 * ALIGN])
def test_free_of_a_misaligned_or_outside_extent_raises(offset):
    allocator = ExtentAllocator(4 * ALIGN)
    allocate_all(allocator, [4 * ALIGN])
    with pytest.raises(ValueError):
        allocator.free(offset, ALIGN)
    assert allocator.used == 4 * ALIGN


# ---------------------------------------------------------------- randomized

CAPACITY_PAGES = 64

operations = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(min_value=0, max_value=12 * ALIGN)),
        st.tuples(st.just("free"), st.integers(min_value=0, max_value=1000)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.sampled_from([64, ALIGN]))
def test_random_alloc_free_sequences_keep_the_arena_tiled(ops, alignment):
    capacity = CAPACITY_PAGES * alignment
    allocator = ExtentAllocator(capacity, alignment=alignment)
    live: dict[int, int] = {}  # offset -> requested bytes
    for op, value in ops:
        if op == "alloc":
            nbytes = value * alignment // ALIGN
            offset = allocator.allocate(nbytes)
            if offset is None:
                # Refusal is only allowed when no free extent is large enough.
                needed = max(1, -(-nbytes // alignment)) * alignment
                assert all(size < needed for _, size in allocator.free_extents())
            else:
                assert offset not in live
                live[offset] = nbytes
        elif live:
            offset = sorted(live)[value % len(live)]
            allocator.free(offset, live.pop(offset))
        check_invariants(allocator, {offset: allocator.rounded(n) for offset, n in live.items()})
    for offset, nbytes in list(live.items()):
        allocator.free(offset, nbytes)
    assert allocator.free_extents() == [(0, capacity)]
