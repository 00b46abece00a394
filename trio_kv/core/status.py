"""The server's state, built once from the engine's own counters.

The Status reply, the admin HTTP ``/v1/status`` and ``/healthz`` views and the Prometheus
scrape all read this one snapshot; none of them recounts anything.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import __version__
from ..protocol import InstanceInfo, StatusResult, TierStatus

# Python objects behind each chunk L1 holds (entry, LRU and ledger slots) and each object an L2
# tier's ledger knows, measured with tracemalloc on CPython 3.11 (docs/operating.md#memory).
L1_METADATA_BYTES_PER_CHUNK = 310
L2_METADATA_BYTES_PER_OBJECT = 320

if TYPE_CHECKING:
    from .engine import CacheEngine
    from .tiering import Tiering


def engine_status(engine: CacheEngine) -> StatusResult:
    l1 = engine.l1
    return StatusResult(
        server_version=__version__,
        uptime_s=time.monotonic() - engine.started_at,
        chunk_size=engine.chunk_size,
        l1=l1.ledger.usage(),
        l1_entries=len(l1),
        leases=len(engine.leases),
        sessions=len(engine.sessions),
        instances=[
            InstanceInfo(name, c.layout.num_blocks, c.layout.block_size, c.layout.block_bytes)
            for name, c in sorted(engine.instances.items())
        ],
        requests_in_flight=engine.requests_in_flight,
        l2=[] if engine.tiering is None else tier_statuses(engine.tiering),
        l1_evictions=dict(sorted(l1.evictions_by_reason.items())),
        l1_refusals={
            refusal.value: n for refusal, n in sorted(l1.refusals.items(), key=lambda r: r[0].value)
        },
        session_bytes=engine.sessions.nbytes,
        memory_bytes=memory_estimate(engine),
        layout_mismatches=engine.layout_mismatches,
        inflight_hits=engine.inflight.hits,
        inflight_wait_timeouts=engine.inflight.wait_timeouts,
        inflight_chunks=len(engine.inflight),
    )


def memory_estimate(engine: CacheEngine) -> dict[str, int]:
    """What the server holds, by part: the L1 arena (allocated whole at start), metadata per
    L1 chunk and per L2 object, and the hash sessions."""
    l2_objects = 0 if engine.tiering is None else sum(len(t.l2.ledger) for t in engine.tiering.tiers)
    return {
        "l1_arena": engine.l1.capacity,
        "l1_metadata": L1_METADATA_BYTES_PER_CHUNK * len(engine.l1),
        "l2_metadata": L2_METADATA_BYTES_PER_OBJECT * l2_objects,
        "sessions": engine.sessions.nbytes,
    }


def tier_statuses(tiering: Tiering) -> list[TierStatus]:
    """Each L2 tier's usage, health and traffic counters, in lookup order."""
    statuses = []
    for tier in tiering.tiers:
        l2, counters = tier.l2, tier.counters
        health = l2.health()
        statuses.append(
            TierStatus(
                name=l2.name,
                kind=l2.kind,
                usage=l2.usage(),
                healthy=health.healthy,
                state=health.state,
                reason=health.reason,
                queue_depth=tier.send.statistics().current_buffer_used,
                queued=counters.queued,
                dropped=counters.dropped,
                skipped_evicted=counters.skipped_evicted,
                written=counters.written,
                write_failures=counters.write_failures,
                loads=counters.loads,
                load_failures=counters.load_failures,
                lookup_errors=counters.lookup_errors,
                evictions=l2.evictions,
                quota_skips=counters.quota_skips,
                write_timeouts=counters.write_timeouts,
                load_timeouts=counters.load_timeouts,
                evictions_by_reason=dict(l2.evictions_by_reason),
                evict_errors=l2.errors,
                lost=counters.lost,
                skipped_orphan=counters.skipped_orphan,
                breaker_skips=counters.breaker_skips,
            )
        )
    return statuses
