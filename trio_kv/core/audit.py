"""Audits: recount what a tier holds from its entries and compare with its books.

Tests and the soak call these after injecting faults: any mismatch is a leak.
"""

from __future__ import annotations

from .l1 import L1Store
from .leases import LeaseTable


def audit_l1(l1: L1Store, leases: LeaseTable) -> list[str]:
    """Bytes per salt, allocator usage and lease counts recounted from L1's entries;
    also flags entries left half-written or with readers. Returns each problem found."""
    problems = []
    entries = l1.entries()
    recount: dict[str, int] = {}
    for entry in entries:
        recount[entry.key.cache_salt] = recount.get(entry.key.cache_salt, 0) + entry.size
    if dict(l1.ledger.bytes_by_salt) != recount:
        problems.append(f"ledger by salt {dict(l1.ledger.bytes_by_salt)} != recount {recount}")
    if l1.ledger.total != sum(recount.values()):
        problems.append(f"ledger total {l1.ledger.total} != recount {sum(recount.values())}")
    if l1.allocator.used != sum(recount.values()):
        problems.append(f"allocator used {l1.allocator.used} != recount {sum(recount.values())}")
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
    return problems
