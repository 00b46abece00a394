"""Requests answered, by kind and outcome, and their latency histograms: plain numbers on the
Trio thread, turned into Prometheus families only when scraped.

prometheus-client's ``Counter.inc`` and ``Histogram.observe`` take a lock each and search the
buckets one by one. Here a request costs an attribute increment and one ``bisect``: recording
a lookup's metrics (``ServerMetrics.record_request``) went 1.9 -> 0.8 us. Only the Trio thread writes these numbers,
and a scrape runs on that thread too, so it never reads a half-made update. The series are
the ones prometheus-client made (``trio_kv_requests_total``, the ``_bucket``/``_count``/``_sum``
of ``trio_kv_request_duration_seconds``), less its ``_created`` samples.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from ..errors import ErrorCode

# Requests take ~0.1 ms (lookups) to tens of ms (large copies); the prometheus defaults start at 5 ms.
REQUEST_BUCKETS = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BOUNDS = [floatToGoString(bound) for bound in REQUEST_BUCKETS] + ["+Inf"]


def outcome_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code_{code}"


class KindCounts:
    """One request kind's answers: ok, errors by code, and a latency histogram."""

    __slots__ = ("buckets", "errors", "kind", "ok", "seconds")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ok = 0
        self.errors: dict[int, int] = {}
        self.buckets = [0] * len(_BOUNDS)  # not cumulative; the last is +Inf
        self.seconds = 0.0

    def observe(self, seconds: float) -> None:
        # A sample equal to a bound belongs to that bound's bucket (le: less than or equal).
        self.buckets[bisect.bisect_left(REQUEST_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


def request_families(kinds: Iterable[KindCounts]) -> Iterator[Metric]:
    """``trio_kv_requests`` and ``trio_kv_request_duration_seconds`` as they stand now."""
    requests = CounterMetricFamily(
        "trio_kv_requests",
        "Requests answered, by kind (request tag) and outcome (ok or the error code's name).",
        labels=["kind", "outcome"],
    )
    latency = HistogramMetricFamily(
        "trio_kv_request_duration_seconds",
        "Time from decoding a request to having its reply, by kind.",
        labels=["kind"],
    )
    for counts in kinds:
        requests.add_metric([counts.kind, "ok"], counts.ok)
        for code, count in sorted(counts.errors.items()):
            requests.add_metric([counts.kind, outcome_name(code)], count)
        cumulative = zip(_BOUNDS, itertools.accumulate(counts.buckets))
        latency.add_metric([counts.kind], list(cumulative), counts.seconds)
    yield requests
    yield latency
