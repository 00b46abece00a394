"""The L2 tiers' metric families, read from one status snapshot at scrape time (``metrics``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..protocol import TierStatus


def l2_metrics(tiers: list[TierStatus]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "trio_kv_l2_queue_depth", "Chunks waiting for write-behind, by tier.", labels=["tier"]
    )
    dropped = CounterMetricFamily(
        "trio_kv_l2_queue_dropped",
        "Chunks dropped because the write-behind queue was full.",
        labels=["tier"],
    )
    writes = CounterMetricFamily(
        "trio_kv_l2_writes",
        "Write-behind outcomes: written, failed, breaker_skipped, quota_skipped, timed_out,"
        " skipped_evicted, skipped_orphan; lost counts every chunk never written (dropped included).",
        labels=["tier", "outcome"],
    )
    loads = CounterMetricFamily(
        "trio_kv_l2_loads", "Loads into L1: loaded, failed, timed_out.", labels=["tier", "outcome"]
    )
    errors = CounterMetricFamily(
        "trio_kv_l2_errors", "Adapter errors, by tier and operation.", labels=["tier", "op"]
    )
    healthy = GaugeMetricFamily("trio_kv_l2_healthy", "1 if the adapter reports healthy.", labels=["tier"])
    breaker = GaugeMetricFamily(
        "trio_kv_l2_breaker_open", "1 while the adapter's circuit breaker is open.", labels=["tier"]
    )
    for tier in tiers:
        name = tier.name
        depth.add_metric([name], tier.queue_depth)
        dropped.add_metric([name], tier.dropped)
        for outcome, count in (
            ("written", tier.written),
            ("failed", tier.write_failures),
            ("quota_skipped", tier.quota_skips),
            ("timed_out", tier.write_timeouts),
            ("skipped_evicted", tier.skipped_evicted),
            ("breaker_skipped", tier.breaker_skips),
            ("skipped_orphan", tier.skipped_orphan),
            ("lost", tier.lost),
        ):
            writes.add_metric([name, outcome], count)
        for outcome, count in (
            ("loaded", tier.loads),
            ("failed", tier.load_failures),
            ("timed_out", tier.load_timeouts),
        ):
            loads.add_metric([name, outcome], count)
        for op, count in (
            ("write", tier.write_failures),
            ("load", tier.load_failures),
            ("lookup", tier.lookup_errors),
            ("evict", tier.evict_errors),
        ):
            errors.add_metric([name, op], count)
        healthy.add_metric([name], 1 if tier.healthy else 0)
        breaker.add_metric([name], 1 if tier.state == "breaker-open" else 0)
    yield from (depth, dropped, writes, loads, errors, healthy, breaker)
