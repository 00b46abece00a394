"""Prometheus metrics: after real traffic through a real server, /metrics (scraped over HTTP and
parsed with prometheus-client's own parser) names every family with counts that match the traffic."""

from __future__ import annotations

import random
import time

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from trio_kv.adapters.base import AdapterHealth
from trio_kv.client import AsyncClient
from trio_kv.errors import ServerError
from trio_kv.keys import RequestKey
from trio_kv.testing import admin_request, running_server

from .conftest import BLOCK_SIZE, CHUNK_SIZE

BLOCKS_PER_CHUNK = CHUNK_SIZE // BLOCK_SIZE


def tokens(n_chunks: int, seed: int = 0, extra: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n_chunks * CHUNK_SIZE + extra)]


def blocks(n_chunks: int, first: int = 0) -> list[int]:
    return list(range(first, first + n_chunks * BLOCKS_PER_CHUNK))


def chunk_bytes(kv) -> int:
    return BLOCKS_PER_CHUNK * len(kv.block_bytes(0))


class Scrape:
    """One parsed /metrics page."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}


async def scrape(server) -> Scrape:
    response = await admin_request(server, "GET", "/metrics")
    assert response.status == 200
    return Scrape(response.body.decode())


@pytest.fixture
async def mock_server():
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB", l2=["mock:"]) as running:
        yield running


async def connect(server, kv) -> AsyncClient:
    client = await AsyncClient.connect(server.url, timeout_s=10)
    await client.register_kv_cache("w", kv)
    return client


# ---------------------------------------------------------------- requests


async def test_requests_are_counted_by_kind_and_outcome(server, kv):
    async with await connect(server, kv) as client:
        for seed in (1, 2):
            await client.store("w", RequestKey("m", 1, 0, tokens(1, seed)), blocks(1))
        await client.lookup(RequestKey("m", 1, None, tokens(1, 1)))
        with pytest.raises(ServerError):
            await client.store("nobody", RequestKey("m", 1, 0, tokens(1)), blocks(1))
        with pytest.raises(ServerError):
            await client.lookup(RequestKey("m", 1, None, tokens(1), cache_salt="a/b"))
    await server.server.handle(b"\xc1 not msgpack")
    metrics = await scrape(server)
    assert metrics.types["trio_kv_requests"] == "counter"
    counted = {labels: value for labels, value in metrics.labelled("trio_kv_requests_total").items() if value}
    assert counted == {
        frozenset({("kind", "hello"), ("outcome", "ok")}): 1,
        frozenset({("kind", "register"), ("outcome", "ok")}): 1,
        frozenset({("kind", "store"), ("outcome", "ok")}): 2,
        frozenset({("kind", "store"), ("outcome", "UNKNOWN_INSTANCE")}): 1,
        frozenset({("kind", "lookup"), ("outcome", "ok")}): 1,
        frozenset({("kind", "lookup"), ("outcome", "BAD_SALT")}): 1,
        frozenset({("kind", "unknown"), ("outcome", "BAD_REQUEST")}): 1,
    }
    # Every kind has its latency histogram ready, requests or not; counts match the requests.
    assert metrics.value("trio_kv_request_duration_seconds_count", kind="store") == 3
    assert metrics.value("trio_kv_request_duration_seconds_count", kind="lookup") == 2
    assert metrics.value("trio_kv_request_duration_seconds_count", kind="retrieve") == 0
    assert metrics.value("trio_kv_request_duration_seconds_bucket", kind="store", le="+Inf") == 3


# ---------------------------------------------------------------- lookups and bytes


async def test_lookup_hit_and_miss_tokens_by_tier_and_salt_match_the_traffic(mock_server, kv):
    prompt = tokens(4, extra=5)  # 4 full chunks and 5 tokens that no lookup can hit
    async with await connect(mock_server, kv) as client:
        await client.store("w", RequestKey("m", 1, 0, prompt[: 2 * CHUNK_SIZE], cache_salt="t"), blocks(2))
        await trio.testing.wait_all_tasks_blocked()  # write-behind to the mock tier done
        await admin_request(mock_server, "POST", "/v1/clear", {"cache_salt": "t"})  # L1 only
        first = await client.lookup(RequestKey("m", 1, None, prompt, cache_salt="t"))
        second = await client.lookup(RequestKey("m", 1, None, prompt, cache_salt="t"))
        await client.lookup(RequestKey("m", 1, None, tokens(2, seed=9)))  # empty salt: all misses
    assert (first.l1_chunks, first.l2_chunks) == (0, 2)
    assert (second.l1_chunks, second.l2_chunks) == (2, 0)
    metrics = await scrape(mock_server)
    assert metrics.value("trio_kv_lookups_total", salt="t") == 2
    assert metrics.value("trio_kv_lookup_hit_tokens_total", tier="l2", salt="t") == 2 * CHUNK_SIZE
    assert metrics.value("trio_kv_lookup_hit_tokens_total", tier="l1", salt="t") == 2 * CHUNK_SIZE
    assert metrics.value("trio_kv_lookup_miss_tokens_total", salt="t") == 2 * 2 * CHUNK_SIZE
    assert metrics.value("trio_kv_lookups_total", salt="@empty") == 1
    assert metrics.value("trio_kv_lookup_hit_tokens_total", tier="l1", salt="@empty") == 0
    assert metrics.value("trio_kv_lookup_miss_tokens_total", salt="@empty") == 2 * CHUNK_SIZE
    assert metrics.value("trio_kv_l2_loads_total", tier="mock", outcome="loaded") == 2
    assert metrics.value("trio_kv_l2_writes_total", tier="mock", outcome="written") == 2


async def test_bytes_stored_and_retrieved_match_the_chunks_moved(server, kv):
    prompt = tokens(3)
    async with await connect(server, kv) as client:
        await client.store("w", RequestKey("m", 1, 0, prompt, cache_salt="t"), blocks(3))
        again = await client.store("w", RequestKey("m", 1, 0, prompt, cache_salt="t"), blocks(3))
        assert again.skipped_present == 3  # nothing copied: no bytes counted
        got = await client.retrieve("w", RequestKey("m", 1, 0, prompt, cache_salt="t"), blocks(3, first=16))
        assert got.chunks_written == 3
    metrics = await scrape(server)
    assert metrics.value("trio_kv_stored_bytes_total", salt="t") == 3 * chunk_bytes(kv)
    assert metrics.value("trio_kv_retrieved_bytes_total", salt="t") == 3 * chunk_bytes(kv)


# ---------------------------------------------------------------- usage, capacity, quotas


async def test_usage_capacity_and_quotas_per_tier_and_salt(kv):
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB", l2=["mock:?capacity=1MiB"]) as running:
        async with await connect(running, kv) as client:
            await client.store("w", RequestKey("m", 1, 0, tokens(2), cache_salt="t"), blocks(2))
            await client.store("w", RequestKey("m", 1, 0, tokens(1, seed=3)), blocks(1))
            await trio.testing.wait_all_tasks_blocked()
        await admin_request(running, "PUT", "/v1/quota/t", {"l1": "8MiB", "mock": "512KiB"})
        await admin_request(running, "PUT", "/v1/quota/@default", {"l1": "1MiB"})
        metrics = await scrape(running)
        l1 = running.engine.l1
        assert metrics.value("trio_kv_tier_used_bytes", tier="l1") == l1.ledger.total
        assert metrics.value("trio_kv_tier_capacity_bytes", tier="l1") == l1.capacity
        assert metrics.value("trio_kv_tier_used_bytes", tier="mock") == 3 * chunk_bytes(kv)
        assert metrics.value("trio_kv_tier_capacity_bytes", tier="mock") == 1024**2
        assert metrics.value("trio_kv_salt_used_bytes", tier="l1", salt="t") == l1.ledger.salt_bytes("t")
        assert metrics.value("trio_kv_salt_used_bytes", tier="l1", salt="@empty") == l1.ledger.salt_bytes("")
        assert metrics.value("trio_kv_salt_used_bytes", tier="mock", salt="t") == 2 * chunk_bytes(kv)
        assert metrics.labelled("trio_kv_salt_quota_bytes") == {
            frozenset({("tier", "l1"), ("salt", "t")}): 8 * 1024**2,
            frozenset({("tier", "mock"), ("salt", "t")}): 512 * 1024,
            frozenset({("tier", "l1"), ("salt", "@default")}): 1024**2,
        }


async def test_an_unbounded_tier_has_no_capacity_sample(mock_server):
    metrics = await scrape(mock_server)
    assert metrics.value("trio_kv_tier_capacity_bytes", tier="mock") is None
    assert metrics.value("trio_kv_tier_used_bytes", tier="mock") == 0


# ---------------------------------------------------------------- evictions


async def test_l1_evictions_by_reason_match_the_store(kv):
    # 64 KiB of L1 holds 4 chunks of 16 KiB; tenant q may hold 2.
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="64KiB") as running:
        await admin_request(running, "PUT", "/v1/quota/q", {"l1": 2 * chunk_bytes(kv)})
        async with await connect(running, kv) as client:
            for seed in (11, 12, 13):  # one chunk per request: a chunk being written is not evictable
                await client.store("w", RequestKey("m", 1, 0, tokens(1, seed), cache_salt="q"), blocks(1))
            for seed in range(2, 8):
                await client.store("w", RequestKey("m", 1, 0, tokens(1, seed)), blocks(1))
        await trio.testing.wait_all_tasks_blocked()
        by_reason = dict(running.engine.l1.evictions_by_reason)
        metrics = await scrape(running)
    assert by_reason["quota"] == 1  # q's third chunk pushed out its first
    assert sum(by_reason.values()) >= 3  # 9 chunks went through room for 4
    assert {
        dict(labels)["reason"]: value
        for labels, value in metrics.labelled("trio_kv_evictions_total").items()
        if dict(labels)["tier"] == "l1"
    } == by_reason


async def test_l2_evictions_are_counted_per_tier(kv):
    async with running_server(chunk_size=CHUNK_SIZE, l2=["mock:?capacity=32KiB"]) as running:
        async with await connect(running, kv) as client:
            await client.store("w", RequestKey("m", 1, 0, tokens(4)), blocks(4))
            await trio.testing.wait_all_tasks_blocked()
        l2 = running.server.l2_tiers[0]
        metrics = await scrape(running)
    assert l2.evictions >= 2  # 4 chunks of 16 KiB into 32 KiB
    assert l2.evictions_by_reason == {"watermark": l2.evictions}
    assert metrics.value("trio_kv_evictions_total", tier="mock", reason="watermark") == l2.evictions


async def test_l2_quota_evictions_have_their_own_reason(kv):
    async with running_server(chunk_size=CHUNK_SIZE, l2=["mock:"]) as running:
        running.server.quotas.set("", {"mock": "32KiB"})
        async with await connect(running, kv) as client:
            await client.store("w", RequestKey("m", 1, 0, tokens(4)), blocks(4))
            await trio.testing.wait_all_tasks_blocked()
        l2 = running.server.l2_tiers[0]
        metrics = await scrape(running)
        status = (await admin_request(running, "GET", "/v1/status")).json()
    assert l2.evictions_by_reason["quota"] >= 2  # 4 chunks of 16 KiB under a 32 KiB quota
    assert status["l2"][0]["evictions_by_reason"] == {"quota": l2.evictions}
    assert metrics.value("trio_kv_evictions_total", tier="mock", reason="quota") == l2.evictions


# ---------------------------------------------------------------- write-behind, errors, health


async def test_a_full_write_behind_queue_drops_and_counts(kv):
    async with running_server(chunk_size=CHUNK_SIZE, l2=["mock:"], l2_queue_size=1, l2_writers=1) as running:
        l2 = running.server.l2_tiers[0]
        l2.adapter.stall("put")
        async with await connect(running, kv) as client:
            await client.store("w", RequestKey("m", 1, 0, tokens(4)), blocks(4))
            await trio.testing.wait_all_tasks_blocked()
            counters = running.server.tiering.counters(l2)
            metrics = await scrape(running)
            l2.adapter.unstall()
    assert counters.dropped > 0
    assert metrics.value("trio_kv_l2_queue_dropped_total", tier="mock") == counters.dropped
    assert (
        metrics.value("trio_kv_l2_queue_depth", tier="mock") == 4 - counters.dropped - 1
    )  # one is being put


async def test_failed_writes_are_adapter_errors(mock_server, kv):
    adapter = mock_server.server.l2_tiers[0].adapter
    adapter.fail_rate = 1.0
    adapter.fail_ops = ("put",)
    async with await connect(mock_server, kv) as client:
        await client.store("w", RequestKey("m", 1, 0, tokens(2)), blocks(2))
        await trio.testing.wait_all_tasks_blocked()
    metrics = await scrape(mock_server)
    # The first chunk's put fails; the second, unreachable without it, is not sent.
    assert metrics.value("trio_kv_l2_writes_total", tier="mock", outcome="failed") == 1
    assert metrics.value("trio_kv_l2_writes_total", tier="mock", outcome="skipped_orphan") == 1
    assert metrics.value("trio_kv_l2_writes_total", tier="mock", outcome="lost") == 2
    assert metrics.value("trio_kv_l2_errors_total", tier="mock", op="write") == 1
    assert metrics.value("trio_kv_l2_errors_total", tier="mock", op="lookup") == 0


async def test_breaker_state_and_health_follow_the_adapter(mock_server):
    adapter = mock_server.server.l2_tiers[0].adapter
    metrics = await scrape(mock_server)
    assert metrics.value("trio_kv_l2_breaker_open", tier="mock") == 0
    assert metrics.value("trio_kv_l2_healthy", tier="mock") == 1
    adapter.health = lambda: AdapterHealth(healthy=False, state="breaker-open", reason="down")  # type: ignore[method-assign]
    metrics = await scrape(mock_server)
    assert metrics.value("trio_kv_l2_breaker_open", tier="mock") == 1
    assert metrics.value("trio_kv_l2_healthy", tier="mock") == 0


# ---------------------------------------------------------------- event loop, isolation, inventory


async def test_the_loop_lag_probe_records_how_long_the_loop_was_stalled(server):
    metrics = server.server.metrics
    async with trio.open_nursery() as nursery:
        nursery.start_soon(metrics.run_loop_lag_probe, 0.01)
        await trio.testing.wait_all_tasks_blocked()  # the probe sleeps
        time.sleep(0.1)  # noqa: ASYNC251 - stalling the event loop is the point
        await trio.testing.wait_all_tasks_blocked()  # the probe woke late and recorded it
        nursery.cancel_scope.cancel()
    assert metrics.loop_lag_last_s >= 0.05
    scraped = await scrape(server)
    assert scraped.value("trio_kv_event_loop_lag_seconds_count") >= 1
    assert scraped.value("trio_kv_event_loop_lag_seconds_bucket", le="0.05") < scraped.value(
        "trio_kv_event_loop_lag_seconds_count"
    )


async def test_two_servers_in_one_process_keep_separate_metrics(kv):
    async with running_server(chunk_size=CHUNK_SIZE) as busy, running_server(chunk_size=CHUNK_SIZE) as idle:
        async with await connect(busy, kv) as client:
            await client.store("w", RequestKey("m", 1, 0, tokens(1)), blocks(1))
        busy_metrics, idle_metrics = await scrape(busy), await scrape(idle)
    assert busy_metrics.value("trio_kv_requests_total", kind="store", outcome="ok") == 1
    assert idle_metrics.value("trio_kv_requests_total", kind="store", outcome="ok") == 0
    assert idle_metrics.value("trio_kv_stored_bytes_total", salt="@empty") is None


async def test_every_documented_family_is_exposed(mock_server, kv):
    async with await connect(mock_server, kv) as client:
        await client.store("w", RequestKey("m", 1, 0, tokens(1)), blocks(1))
        await client.lookup(RequestKey("m", 1, None, tokens(1)))
        metrics = await scrape(mock_server)  # while the registering connection is open
    expected = {
        "trio_kv_requests": "counter",
        "trio_kv_request_duration_seconds": "histogram",
        "trio_kv_lookups": "counter",
        "trio_kv_lookup_hit_tokens": "counter",
        "trio_kv_lookup_miss_tokens": "counter",
        "trio_kv_stored_bytes": "counter",
        "trio_kv_retrieved_bytes": "counter",
        "trio_kv_tier_used_bytes": "gauge",
        "trio_kv_tier_capacity_bytes": "gauge",
        "trio_kv_salt_used_bytes": "gauge",
        "trio_kv_salt_quota_bytes": "gauge",
        "trio_kv_evictions": "counter",
        "trio_kv_l1_refusals": "counter",
        "trio_kv_layout_mismatches": "counter",
        "trio_kv_l2_queue_depth": "gauge",
        "trio_kv_l2_queue_dropped": "counter",
        "trio_kv_l2_writes": "counter",
        "trio_kv_l2_loads": "counter",
        "trio_kv_l2_errors": "counter",
        "trio_kv_l2_healthy": "gauge",
        "trio_kv_l2_breaker_open": "gauge",
        "trio_kv_l1_entries": "gauge",
        "trio_kv_leases": "gauge",
        "trio_kv_sessions": "gauge",
        "trio_kv_session_bytes": "gauge",
        "trio_kv_memory_estimate_bytes": "gauge",
        "trio_kv_instances": "gauge",
        "trio_kv_requests_in_flight": "gauge",
        "trio_kv_event_loop_lag_seconds": "histogram",
        "trio_kv_event_loop_lag_last_seconds": "gauge",
        "trio_kv_build_info": "gauge",
        "trio_kv_gc_frozen_objects": "gauge",
    }
    assert {name: metrics.types.get(name) for name in expected} == expected
    assert metrics.value("trio_kv_l1_entries") == 1
    assert metrics.value("trio_kv_instances") == 1


async def test_status_reply_admin_view_and_metrics_report_one_snapshot(kv):
    # Evictions, a quota refusal and L2 usage, then all three views read while nothing moves.
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="64KiB", l2=["mock:"]) as running:
        await admin_request(running, "PUT", "/v1/quota/q", {"l1": chunk_bytes(kv) // 2})
        async with await connect(running, kv) as client:
            stored = await client.store("w", RequestKey("m", 1, 0, tokens(1, 1), cache_salt="q"), blocks(1))
            for seed in range(2, 8):
                await client.store("w", RequestKey("m", 1, 0, tokens(1, seed)), blocks(1))
            await trio.testing.wait_all_tasks_blocked()
            reply = await client.status()
        view = (await admin_request(running, "GET", "/v1/status")).json()
        metrics = await scrape(running)
    assert stored.skipped_quota == 1  # a chunk over q's quota is refused, not stored
    assert reply.l1_refusals == {"quota": 1}
    assert sum(reply.l1_evictions.values()) >= 2  # 6 chunks went through room for 4
    (tier,) = reply.l2
    assert tier.usage.total_bytes_used == 6 * chunk_bytes(kv)
    assert view["l1_evictions"] == reply.l1_evictions
    assert view["l1_refusals"] == reply.l1_refusals
    assert view["l1"]["total_bytes_used"] == reply.l1.total_bytes_used
    assert view["l2"][0]["usage"]["total_bytes_used"] == tier.usage.total_bytes_used
    assert metrics.value("trio_kv_tier_used_bytes", tier="l1") == reply.l1.total_bytes_used
    assert metrics.value("trio_kv_tier_used_bytes", tier=tier.name) == tier.usage.total_bytes_used
    assert metrics.value("trio_kv_l1_refusals_total", reason="quota") == 1
    assert {
        dict(labels)["reason"]: value
        for labels, value in metrics.labelled("trio_kv_evictions_total").items()
        if dict(labels)["tier"] == "l1"
    } == reply.l1_evictions
