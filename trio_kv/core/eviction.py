"""Eviction policy: which tenant gives up bytes when a tier must make room. Pure.

* ``lru``: global least-recently-used order; tenants compete on recency alone.
* ``isolated``: one LRU per salt. The victim is the tenant furthest over its
  share, measured as usage / share, where a tenant's share is its quota in
  that tier if it has one, else an equal split of the capacity among the
  tenants holding evictable bytes. Within that tenant, its own LRU chunk goes.
  A tenant under its share loses nothing while another is over theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

POLICIES = ("lru", "isolated")


def choose_victim_salt(
    candidates: Iterable[str],
    bytes_by_salt: Mapping[str, int],
    capacity: int,
    quota_of: Callable[[str], int | None] | None,
) -> str | None:
    """The salt (among ``candidates``, those with something evictable) to evict from next."""
    salts = list(candidates)
    if not salts:
        return None
    fair_share = max(1, capacity // len(salts))

    def pressure(salt: str) -> float:
        quota = quota_of(salt) if quota_of is not None else None
        share = quota if quota else fair_share
        return bytes_by_salt.get(salt, 0) / share

    # Ties go to the larger tenant, then to the name, so the choice is deterministic.
    return max(salts, key=lambda s: (pressure(s), bytes_by_salt.get(s, 0), s))
