"""Extent allocator: alignment, fits, splitting, coalescing, exhaustion, and a randomized
check that allocations and free extents always tile the arena exactly."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_kv.core.allocator import ExtentAllocator

ALIGN = 4096


def check_invariants(allocator: ExtentAllocator) -> None:
    """Allocations never overlap, stay inside the arena, add up to ``used``, and together
    with the (coalesced) free extents cover the arena with no gap."""
    allocations = allocator.allocations()
    free = allocator.free_extents()
    assert allocator.used == sum(allocations.values())
    assert allocator.free_bytes == sum(size for _, size in free)
    pieces = sorted([(o, s, "used") for o, s in allocations.items()] + [(o, s, "free") for o, s in free])
    cursor = 0
    for offset, size, _ in pieces:
        assert offset == cursor, f"gap or overlap at {cursor}: {pieces}"
        assert size > 0 and offset % allocator.alignment == 0 and size % allocator.alignment == 0
        cursor += size
    assert cursor == allocator.capacity
    for (_, _, a), (_, _, b) in itertools.pairwise(pieces):
        assert not (a == b == "free"), f"adjacent free extents were not coalesced: {free}"


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
    assert allocator.size_of(first) == allocator.size_of(second) == expected
    assert first % ALIGN == 0 and second % ALIGN == 0
    assert allocator.used == 2 * expected


def test_small_alignment_is_respected():
    allocator = ExtentAllocator(1024, alignment=64)
    offsets = [allocator.allocate(n) for n in (1, 63, 64, 65)]
    assert offsets == [0, 64, 128, 192]
    assert allocator.size_of(192) == 128


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
    offsets = [allocator.allocate(ALIGN) for _ in range(4)]
    allocator.free(offsets[1])
    assert allocator.allocate(ALIGN) == offsets[1]
    check_invariants(allocator)


def test_first_fit_skips_holes_that_are_too_small():
    allocator = ExtentAllocator(8 * ALIGN)
    a, _b, _c = (allocator.allocate(ALIGN) for _ in range(3))
    allocator.free(a)  # a one-page hole at 0
    assert allocator.allocate(2 * ALIGN) == 3 * ALIGN
    check_invariants(allocator)


def test_full_arena_returns_none():
    allocator = ExtentAllocator(2 * ALIGN)
    allocator.allocate(ALIGN)
    allocator.allocate(ALIGN)
    assert allocator.allocate(1) is None
    assert allocator.used == 2 * ALIGN


def test_request_larger_than_any_free_extent_returns_none():
    allocator = ExtentAllocator(4 * ALIGN)
    offsets = [allocator.allocate(ALIGN) for _ in range(4)]
    allocator.free(offsets[0])
    allocator.free(offsets[2])  # two free pages, not adjacent
    assert allocator.free_bytes == 2 * ALIGN
    assert allocator.largest_free() == ALIGN
    assert allocator.allocate(2 * ALIGN) is None
    check_invariants(allocator)


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
    assert allocator.free(offset) == 2 * ALIGN
    assert allocator.used == 0


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))), ids=str)
def test_frees_in_any_order_coalesce_back_to_one_extent(order):
    allocator = ExtentAllocator(4 * ALIGN)
    offsets = [allocator.allocate(ALIGN) for _ in range(4)]
    for index in order:
        allocator.free(offsets[index])
        check_invariants(allocator)
    assert allocator.free_extents() == [(0, 4 * ALIGN)]
    assert allocator.used == 0


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
def test_frees_of_mixed_sizes_with_a_free_tail_coalesce_back_to_one_extent(order):
    allocator = ExtentAllocator(10 * ALIGN)
    offsets = [allocator.allocate(n * ALIGN) for n in (1, 3, 2)]
    for index in order:
        allocator.free(offsets[index])
    assert allocator.free_extents() == [(0, 10 * ALIGN)]


def test_double_free_raises():
    allocator = ExtentAllocator(4 * ALIGN)
    offset = allocator.allocate(ALIGN)
    allocator.free(offset)
    with pytest.raises(ValueError):
        allocator.free(offset)
    check_invariants(allocator)


def test_free_of_an_offset_inside_an_allocation_raises():
    allocator = ExtentAllocator(4 * ALIGN)
    allocator.allocate(2 * ALIGN)
    with pytest.raises(ValueError):
        allocator.free(ALIGN)
    assert allocator.used == 2 * ALIGN


def test_free_of_a_never_allocated_offset_raises():
    with pytest.raises(ValueError):
        ExtentAllocator(4 * ALIGN).free(0)


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
    live: dict[int, int] = {}  # offset -> requested bytes, tracked independently
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
                assert allocator.size_of(offset) >= nbytes
                live[offset] = nbytes
        elif live:
            offset = sorted(live)[value % len(live)]
            allocator.free(offset)
            del live[offset]
        assert set(allocator.allocations()) == set(live)
        check_invariants(allocator)
    for offset in list(live):
        allocator.free(offset)
    assert allocator.free_extents() == [(0, capacity)]
