"""Request counts kept as plain numbers expose the same series prometheus-client's own Counter
and Histogram would for the same requests."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from trio_kv.errors import ErrorCode
from trio_kv.server.request_counts import REQUEST_BUCKETS, KindCounts, request_families


class _Families:
    def __init__(self, kinds: list[KindCounts]) -> None:
        self.kinds = kinds

    def collect(self):
        return request_families(self.kinds)


def _samples(registry: CollectorRegistry) -> set[str]:
    """Exposition lines without comments and ``_created`` samples (which only the library has)."""
    text = generate_latest(registry).decode()
    return {
        line for line in text.splitlines() if line and not line.startswith("#") and "_created" not in line
    }


def test_the_series_match_prometheus_clients_for_the_same_requests():
    reference = CollectorRegistry(auto_describe=False)
    requests = Counter("trio_kv_requests", "r", ["kind", "outcome"], registry=reference)
    latency = Histogram(
        "trio_kv_request_duration_seconds", "l", ["kind"], buckets=REQUEST_BUCKETS, registry=reference
    )
    kinds = {name: KindCounts(name) for name in ("lookup", "store")}
    for name in kinds:  # every kind's ok and latency series exist, even at zero
        requests.labels(name, "ok")
        latency.labels(name)
    rng = random.Random(7)
    # Samples on the bounds themselves, between them and past the last one.
    samples = [*REQUEST_BUCKETS, *(rng.uniform(0, 40) ** 3 / 4000 for _ in range(500)), 1e-9, 99.0]
    for index, seconds in enumerate(samples):
        name = "lookup" if index % 3 else "store"
        code = ErrorCode.TIMEOUT if index % 7 == 0 else (999 if index % 11 == 0 else None)
        if code is None:
            kinds[name].ok += 1
            requests.labels(name, "ok").inc()
        else:
            kinds[name].error(code)
            outcome = ErrorCode(code).name if code in ErrorCode._value2member_map_ else f"code_{code}"
            requests.labels(name, outcome).inc()
        kinds[name].observe(seconds)
        latency.labels(name).observe(seconds)
    ours = CollectorRegistry(auto_describe=False)
    ours.register(_Families(list(kinds.values())))
    assert _samples(ours) == _samples(reference)


def test_a_sample_on_a_bound_is_counted_in_that_bound_s_bucket():
    counts = KindCounts("lookup")
    counts.observe(REQUEST_BUCKETS[0])
    counts.observe(REQUEST_BUCKETS[0] * 1.0001)
    counts.observe(REQUEST_BUCKETS[-1] * 2)
    assert counts.buckets[0] == 1 and counts.buckets[1] == 1 and counts.buckets[-1] == 1
    assert sum(counts.buckets) == 3
