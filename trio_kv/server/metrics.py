"""Prometheus metrics for one server, on a registry of its own (several servers may share a process).

Two kinds of numbers:

- **Per request** (recorded in ``Server.handle``/``handle_now`` on the Trio thread): request counts by kind and
  outcome and latency histograms (``request_counts``), lookup tokens and bytes moved per salt
  (``SaltTraffic``), all as plain numbers (no lock: only the Trio thread writes them, and
  scrapes read them on that thread), made into Prometheus families at scrape time.
- **At scrape time** (``_StateCollector``): usage, capacity and quotas per tier and salt,
  evictions, write-behind queues, adapter errors and health, read from one ``engine.status()``
  snapshot (``core/status.py``, built from counters that already exist), so the hot paths pay
  nothing for them and the metrics, the Status reply and the admin view cannot disagree.
Salts appear as label values in their URL spelling: the empty salt is ``@empty``.
"""

from __future__ import annotations

import gc
import typing
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector

from ..core.engine import CacheEngine
from ..core.quotas import L1_TIER, QuotaBook, salt_to_url_name
from ..keys import effective_end
from ..protocol import (
    Error,
    Lookup,
    LookupResult,
    Request,
    Retrieve,
    RetrieveResult,
    StatusResult,
    Store,
    StoreResult,
)
from .metrics_l2 import l2_metrics
from .request_counts import KindCounts, request_families

LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # fmt: skip
LOOP_LAG_INTERVAL_S = 0.25
UNKNOWN_KIND = "unknown"  # requests that never decoded (or arrived while draining)


class SaltTraffic:
    """What one tenant asked for and got: lookup tokens by source, bytes moved."""

    __slots__ = (
        "l1_hit_tokens",
        "l2_hit_tokens",
        "lookups",
        "miss_tokens",
        "retrieved_bytes",
        "stored_bytes",
    )

    def __init__(self) -> None:
        self.lookups = 0
        self.l1_hit_tokens = 0
        self.l2_hit_tokens = 0
        self.miss_tokens = 0
        self.stored_bytes = 0
        self.retrieved_bytes = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class ServerMetrics:
    """Every metric of one server. Call ``record_request`` once per answered request."""

    def __init__(self, engine: CacheEngine, quotas: QuotaBook) -> None:
        self.engine = engine
        self.quotas = quotas
        self.registry = CollectorRegistry(auto_describe=False)
        self._loop_lag = Histogram(
            "trio_kv_event_loop_lag_seconds",
            f"How late a task sleeping {LOOP_LAG_INTERVAL_S} s woke up (sampled event-loop lag).",
            buckets=LOOP_LAG_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag_last_s = 0.0
        # Replies the listeners could not hand to nng (set by the server that owns them).
        self.dropped_replies: Callable[[], int] = lambda: 0
        self.traffic: dict[str, SaltTraffic] = {}
        self._kinds: dict[type, KindCounts] = {
            kind: KindCounts(kind.__struct_config__.tag) for kind in typing.get_args(Request)
        }
        self._unknown = KindCounts(UNKNOWN_KIND)
        self.registry.register(_StateCollector(self))
        GCCollector(registry=self.registry)  # python_gc_*: collections and objects per generation

    # ------------------------------------------------------------ per request

    def record_request(self, request: Any, reply: Any, seconds: float) -> None:
        """Count one answered request (``request`` is None if it never decoded)."""
        kind = self._kinds.get(type(request), self._unknown)
        reply_type = type(reply)
        if reply_type is Error:
            kind.error(reply.code)
        else:
            kind.ok += 1
        kind.observe(seconds)
        if reply_type is LookupResult:
            self._record_lookup(request, reply)
        elif reply_type is StoreResult:
            self._salt(request.key.cache_salt).stored_bytes += reply.stored * self._chunk_bytes(request)
        elif reply_type is RetrieveResult:
            traffic = self._salt(request.key.cache_salt)
            traffic.retrieved_bytes += reply.chunks_written * self._chunk_bytes(request)

    def _record_lookup(self, request: Lookup, reply: LookupResult) -> None:
        chunk = self.engine.chunk_size
        traffic = self._salt(request.key.cache_salt)
        l1_tokens = reply.l1_chunks * chunk
        l2_tokens = reply.l2_chunks * chunk
        requested = effective_end(request.key) // chunk * chunk
        traffic.lookups += 1
        traffic.l1_hit_tokens += l1_tokens
        traffic.l2_hit_tokens += l2_tokens
        traffic.miss_tokens += max(0, requested - l1_tokens - l2_tokens)

    def _salt(self, salt: str) -> SaltTraffic:
        traffic = self.traffic.get(salt)
        if traffic is None:
            traffic = self.traffic[salt] = SaltTraffic()
        return traffic

    def _chunk_bytes(self, request: Store | Retrieve) -> int:
        cache = self.engine.instances.get(request.instance_id)
        if cache is None:  # unregistered since: its chunk size is gone with it
            return 0
        layout = cache.layout
        return layout.chunk_bytes(self.engine.chunk_size // layout.block_size)

    # ------------------------------------------------------------ readers

    def traffic_summary(self) -> dict[str, Any]:
        """Lookup and byte totals, overall and per salt (URL names), for the status view."""
        by_salt = {salt_to_url_name(salt): t.as_dict() for salt, t in sorted(self.traffic.items())}
        total = {name: sum(t[name] for t in by_salt.values()) for name in SaltTraffic.__slots__}
        return {"total": total, "by_salt": by_salt}

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics page and its content type, in the format the ``Accept`` header asks for."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # ------------------------------------------------------------ event-loop lag

    async def run_loop_lag_probe(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Sleep ``interval_s`` at a time and record how late each wake-up was. Does nothing under
        a virtual clock (tests), where lag means nothing and a periodic sleeper would make an
        autojump clock race ahead."""
        from trio.testing import MockClock

        if isinstance(trio.lowlevel.current_clock(), MockClock):
            return
        while True:
            deadline = trio.current_time() + interval_s
            await trio.sleep_until(deadline)
            lag = max(0.0, trio.current_time() - deadline)
            self.loop_lag_last_s = lag
            self._loop_lag.observe(lag)


class _StateCollector:
    """At scrape time, reads one snapshot of the server's state (``engine.status()``, the same
    one the Status reply and the admin view are made of) and this server's traffic counters."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        status = metrics.engine.status()
        yield from request_families([*metrics._kinds.values(), metrics._unknown])
        yield from self._traffic(metrics)
        yield from self._usage(status, metrics.quotas)
        yield from l2_metrics(status.l2)

        evictions = CounterMetricFamily(
            "trio_kv_evictions", "Chunks evicted, by tier and reason.", labels=["tier", "reason"]
        )
        for reason, count in status.l1_evictions.items():
            evictions.add_metric([L1_TIER, reason], count)
        for tier in status.l2:
            for reason, count in sorted(tier.evictions_by_reason.items()):
                evictions.add_metric([tier.name, reason], count)
        yield evictions
        refusals = CounterMetricFamily(
            "trio_kv_l1_refusals",
            "L1 reservations refused (quota: the tenant had nothing of its own to evict; "
            "capacity: everything else pinned).",
            labels=["reason"],
        )
        for reason, count in status.l1_refusals.items():
            refusals.add_metric([reason], count)
        yield refusals
        yield _counter(
            "trio_kv_layout_mismatches",
            "Retrieves that stopped at a chunk stored by another KV layout (served as a miss).",
            status.layout_mismatches,
        )
        yield _counter(
            "trio_kv_inflight_hits",
            "Chunks a lookup waited for while they were being stored (or claimed), then found.",
            status.inflight_hits,
        )
        yield _counter(
            "trio_kv_inflight_wait_timeouts",
            "Waits for a chunk in flight that reached inflight_wait_s (a miss from there).",
            status.inflight_wait_timeouts,
        )
        yield _gauge("trio_kv_inflight_chunks", "Chunks being stored or claimed now.", status.inflight_chunks)
        yield _gauge("trio_kv_l1_entries", "Chunks in L1.", status.l1_entries)
        yield _gauge("trio_kv_leases", "Lookup leases held.", status.leases)
        yield _gauge("trio_kv_sessions", "Hash sessions cached.", status.sessions)
        yield _gauge("trio_kv_session_bytes", "Bytes the hash sessions hold.", status.session_bytes)
        memory = GaugeMetricFamily(
            "trio_kv_memory_estimate_bytes",
            "Estimated memory held, by part (l1_arena, l1_metadata, l2_metadata, sessions).",
            labels=["part"],
        )
        for part, nbytes in status.memory_bytes.items():
            memory.add_metric([part], nbytes)
        yield memory
        yield _counter(
            "trio_kv_dropped_replies",
            "Replies not delivered: the client had gone, or too many replies to it were pending.",
            metrics.dropped_replies(),
        )
        yield _gauge("trio_kv_instances", "Registered KV caches.", len(status.instances))
        yield _gauge(
            "trio_kv_gc_frozen_objects",
            "Objects moved out of the cycle collector's reach at start (gc.freeze, trio-kv serve).",
            gc.get_freeze_count(),
        )
        yield _gauge("trio_kv_requests_in_flight", "Requests being handled.", status.requests_in_flight)
        yield _gauge(
            "trio_kv_event_loop_lag_last_seconds",
            "The latest event-loop lag sample.",
            metrics.loop_lag_last_s,
        )
        info = GaugeMetricFamily("trio_kv_build_info", "The server's version.", labels=["version"])
        info.add_metric([status.server_version], 1)
        yield info

    def _traffic(self, metrics: ServerMetrics) -> Iterator[Metric]:
        lookups = CounterMetricFamily("trio_kv_lookups", "Lookups answered, by salt.", labels=["salt"])
        hits = CounterMetricFamily(
            "trio_kv_lookup_hit_tokens",
            "Tokens a lookup found, by the tier they came from (l1, l2) and salt.",
            labels=["tier", "salt"],
        )
        misses = CounterMetricFamily(
            "trio_kv_lookup_miss_tokens",
            "Full-chunk tokens a lookup asked for and did not find, by salt.",
            labels=["salt"],
        )
        stored = CounterMetricFamily(
            "trio_kv_stored_bytes", "Bytes copied into L1 by stores, by salt.", labels=["salt"]
        )
        retrieved = CounterMetricFamily(
            "trio_kv_retrieved_bytes", "Bytes copied out to engines by retrieves, by salt.", labels=["salt"]
        )
        for salt, traffic in metrics.traffic.items():
            name = salt_to_url_name(salt)
            lookups.add_metric([name], traffic.lookups)
            hits.add_metric(["l1", name], traffic.l1_hit_tokens)
            hits.add_metric(["l2", name], traffic.l2_hit_tokens)
            misses.add_metric([name], traffic.miss_tokens)
            stored.add_metric([name], traffic.stored_bytes)
            retrieved.add_metric([name], traffic.retrieved_bytes)
        yield from (lookups, hits, misses, stored, retrieved)

    def _usage(self, status: StatusResult, quotas: QuotaBook) -> Iterator[Metric]:
        used = GaugeMetricFamily("trio_kv_tier_used_bytes", "Bytes held, by tier.", labels=["tier"])
        capacity = GaugeMetricFamily(
            "trio_kv_tier_capacity_bytes", "Capacity by tier (absent when unbounded).", labels=["tier"]
        )
        salt_used = GaugeMetricFamily(
            "trio_kv_salt_used_bytes", "Bytes held, by tier and salt.", labels=["tier", "salt"]
        )
        salt_quota = GaugeMetricFamily(
            "trio_kv_salt_quota_bytes",
            "Quota set per tier and salt (salt @default: the fallback for salts without their own).",
            labels=["tier", "salt"],
        )
        for tier, usage in [(L1_TIER, status.l1), *((t.name, t.usage) for t in status.l2)]:
            used.add_metric([tier], usage.total_bytes_used)
            if usage.total_capacity_bytes:
                capacity.add_metric([tier], usage.total_capacity_bytes)
            for salt, nbytes in usage.bytes_by_salt.items():
                salt_used.add_metric([tier, salt_to_url_name(salt)], nbytes)
        for quota_salt, limits in quotas.all().items():
            for tier, limit in limits.items():
                salt_quota.add_metric([tier, salt_to_url_name(quota_salt)], limit)
        yield from (used, capacity, salt_used, salt_quota)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
