"""Audits: recount what a tier holds from its entries and compare with its books.

Tests and the soak call these after injecting faults: any mismatch is a leak.
"""

from __future__ import annotations

from collections.abc import Mapping

from .allocator import ExtentAllocator
from .l1 import L1Store
from .leases import LeaseTable


def audit_l1(l1: L1Store, leases: LeaseTable) -> list[str]:
    """Bytes per salt, the arena's extents and lease counts recounted from L1's entries;
    also flags entries left half-written or with readers and a broken eviction order.
    Returns each problem found."""
    problems = []
    entries = l1.entries()
    recount: dict[str, int] = {}
    for entry in entries:
        recount[entry.key.cache_salt] = recount.get(entry.key.cache_salt, 0) + l1.size_of(entry)
    if dict(l1.ledger.bytes_by_salt) != recount:
        problems.append(f"ledger by salt {dict(l1.ledger.bytes_by_salt)} != recount {recount}")
    if l1.ledger.total != sum(recount.values()):
        problems.append(f"ledger total {l1.ledger.total} != recount {sum(recount.values())}")
    lease_counts = leases.count_by_entry()
    for entry in entries:
        if entry.state.value != "ready":
            problems.append(f"entry left half-written: {entry}")
        if entry.readers:
            problems.append(f"entry left with readers: {entry}")
        if entry.leases != lease_counts.get(id(entry), 0):
            problems.append(
                f"entry lease count {entry.leases} != lease table {lease_counts.get(id(entry), 0)}"
            )
    problems.extend(l1.order_problems())
    problems.extend(arena_problems(l1.allocator, l1.allocations()))
    return problems


def arena_problems(allocator: ExtentAllocator, allocations: Mapping[int, int]) -> list[str]:
    """Whether ``allocations`` (offset -> size, as their holders recount them) and the
    allocator's free extents tile the arena exactly: no gap, no overlap, nothing outside,
    every extent aligned, adjacent free extents coalesced, ``used`` their sum."""
    problems = []
    if allocator.used != sum(allocations.values()):
        problems.append(f"allocator used {allocator.used} != allocations {sum(allocations.values())}")
    pieces = sorted(
        [(offset, size, "allocated") for offset, size in allocations.items()]
        + [(offset, size, "free") for offset, size in allocator.free_extents()]
    )
    cursor, previous = 0, ""
    for offset, size, kind in pieces:
        if offset != cursor:
            problems.append(f"{'gap' if offset > cursor else 'overlap'} at {cursor} before {kind} {offset}")
        if size <= 0 or offset % allocator.alignment or size % allocator.alignment:
            problems.append(f"{kind} extent ({offset}, {size}) is empty or misaligned")
        if kind == previous == "free":
            problems.append(f"free extents at {offset} were not coalesced")
        cursor, previous = max(cursor, offset + size), kind
    if cursor != allocator.capacity:
        problems.append(f"the extents cover {cursor} bytes of an arena of {allocator.capacity}")
    return problems
