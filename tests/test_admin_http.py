"""The admin HTTP API: real HTTP requests against a real in-process server (urllib in a thread)."""

from __future__ import annotations

import json
import random

import pytest
import trio
import trio.testing

from trio_kv.adapters.base import AdapterHealth
from trio_kv.client import AsyncClient
from trio_kv.keys import RequestKey
from trio_kv.testing import FaultInjector, admin_request, running_server

from .conftest import BLOCK_SIZE, CHUNK_SIZE

TOKEN = "s3cret-token"


def tokens(n_chunks: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n_chunks * CHUNK_SIZE)]


def blocks(n_chunks: int) -> list[int]:
    return list(range(n_chunks * CHUNK_SIZE // BLOCK_SIZE))


async def store(client: AsyncClient, n_chunks: int, salt: str = "", seed: int = 0) -> None:
    result = await client.store(
        "w", RequestKey("m", 1, 0, tokens(n_chunks, seed), cache_salt=salt), blocks(n_chunks)
    )
    assert result.stored == n_chunks


@pytest.fixture
async def mock_server():
    """A server with one in-memory L2 tier named "mock"."""
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB", l2=["mock:"]) as running:
        yield running


@pytest.fixture
async def token_server():
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB", admin_token=TOKEN) as running:
        yield running


# ---------------------------------------------------------------- serving


async def test_the_admin_api_listens_on_the_port_it_was_given_and_reports_the_bound_url(server):
    assert server.admin_url.startswith("http://127.0.0.1:")
    assert not server.admin_url.endswith(":0")
    assert server.server.admin_url == server.admin_url


async def test_no_admin_serves_no_admin_api():
    async with running_server(no_admin=True) as running:
        assert running.admin_url is None


async def test_a_taken_admin_port_is_a_clear_startup_error(server):
    taken = server.admin_url.removeprefix("http://")
    with pytest.RaisesGroup(
        pytest.RaisesExc(OSError, match=f"admin HTTP cannot listen on {taken}"), flatten_subgroups=True
    ):
        async with running_server(admin=taken):
            pass  # pragma: no cover


# ---------------------------------------------------------------- health


async def test_healthz_is_ok_when_every_tier_is_healthy(mock_server):
    response = await admin_request(mock_server, "GET", "/healthz")
    assert (response.status, response.json()) == (200, {"status": "ok"})
    assert response.headers["content-type"] == "application/json"


async def test_healthz_is_200_degraded_and_readyz_503_when_a_tier_is_unhealthy(mock_server):
    adapter = mock_server.server.l2_tiers[0].adapter
    adapter.health = lambda: AdapterHealth(healthy=False, state="breaker-open", reason="5 failures")  # type: ignore[method-assign]
    response = await admin_request(mock_server, "GET", "/healthz")
    assert response.status == 200  # alive: L1 serves without the tier
    assert response.json() == {"status": "degraded", "reasons": ["mock: breaker-open: 5 failures"]}
    response = await admin_request(mock_server, "GET", "/readyz")
    assert response.status == 503
    assert response.json() == {"status": "unhealthy", "reasons": ["mock: breaker-open: 5 failures"]}


async def test_a_draining_server_fails_its_health_check(kv):
    injector = FaultInjector("store.before_copy", "hang")
    async with running_server(chunk_size=CHUNK_SIZE, faults=injector) as running:
        async with await AsyncClient.connect(running.url) as client, trio.open_nursery() as nursery:
            await client.register_kv_cache("w", kv)
            nursery.start_soon(store, client, 1)
            await injector.reached.wait()
            nursery.start_soon(running.server.shutdown)
            await trio.testing.wait_all_tasks_blocked()
            response = await admin_request(running, "GET", "/healthz")
            assert response.status == 503
            assert response.json()["reasons"] == ["shutting down"]
            assert (await admin_request(running, "GET", "/readyz")).status == 503
            injector.release.set()


# ---------------------------------------------------------------- status


async def test_status_reports_version_config_instances_usage_tiers_and_quotas(mock_server, kv):
    async with await AsyncClient.connect(mock_server.url) as client:
        await client.register_kv_cache("w", kv)
        await store(client, 2, salt="tenant-a")
        await client.lookup(RequestKey("m", 1, None, tokens(3), request_id="r", cache_salt="tenant-a"))
        await admin_request(mock_server, "PUT", "/v1/quota/tenant-a", {"l1": "1MiB"})
        status = (await admin_request(mock_server, "GET", "/v1/status")).json()
    engine = mock_server.engine
    assert status["version"] == engine.status().server_version
    assert status["chunk_size"] == CHUNK_SIZE
    assert status["uptime_s"] > 0
    assert status["instances"] == [
        {
            "instance_id": "w",
            "num_blocks": 64,
            "block_size": BLOCK_SIZE,
            "block_bytes": len(kv.block_bytes(0)),
        }
    ]
    assert status["l1"]["bytes_by_salt"] == {"tenant-a": engine.l1.ledger.salt_bytes("tenant-a")}
    assert status["l1"]["total_capacity_bytes"] == engine.l1.capacity
    assert status["l1_entries"] == 2
    assert status["leases"] == 2
    assert status["sessions"] >= 1
    assert status["requests_in_flight"] == 0
    [tier] = status["l2"]
    assert (tier["name"], tier["kind"], tier["healthy"], tier["state"]) == ("mock", "mock", True, "ok")
    assert tier["usage"]["usage_fraction"] == -1.0  # unbounded
    assert status["quotas"] == {"tenant-a": {"l1": 1024**2}}
    assert status["traffic"]["by_salt"]["tenant-a"]["lookups"] == 1
    assert status["config"]["l2"] == ["mock:"]
    assert status["config"]["eviction_policy"] == mock_server.server.config.eviction_policy
    assert status["config"]["admin_token_set"] is False
    assert status["draining"] is False


async def test_status_never_shows_the_admin_token(token_server):
    response = await admin_request(token_server, "GET", "/v1/status")
    assert response.status == 200
    assert response.json()["config"]["admin_token_set"] is True
    assert TOKEN not in response.body.decode()


# ---------------------------------------------------------------- metrics


async def test_metrics_are_prometheus_text_with_the_library_content_type(server):
    from prometheus_client.exposition import choose_encoder

    response = await admin_request(server, "GET", "/metrics")  # urllib sends no Accept header
    assert response.status == 200
    assert response.headers["content-type"] == choose_encoder("")[1]
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert b"# TYPE trio_kv_requests_total counter" in response.body


async def test_metrics_speak_openmetrics_when_asked(server):
    response = await admin_request(
        server, "GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.body.endswith(b"# EOF\n")


# ---------------------------------------------------------------- clear


async def test_clear_without_a_body_drops_every_chunk(server, kv):
    async with await AsyncClient.connect(server.url) as client:
        await client.register_kv_cache("w", kv)
        await store(client, 2, salt="a")
        await store(client, 1, salt="b", seed=1)
        response = await admin_request(server, "POST", "/v1/clear")
    assert response.status == 200
    assert response.json()["entries_removed"] == 3
    assert len(server.engine.l1) == 0


async def test_clear_of_one_salt_keeps_the_others(server, kv):
    async with await AsyncClient.connect(server.url) as client:
        await client.register_kv_cache("w", kv)
        await store(client, 2, salt="a")
        await store(client, 1, salt="b", seed=1)
        response = await admin_request(server, "POST", "/v1/clear", {"cache_salt": "a"})
    assert response.json()["entries_removed"] == 2
    assert dict(server.engine.l1.ledger.bytes_by_salt).keys() == {"b"}


async def test_clear_with_include_l2_deletes_l2_objects_too(mock_server, kv):
    async with await AsyncClient.connect(mock_server.url) as client:
        await client.register_kv_cache("w", kv)
        await store(client, 2)
        await trio.testing.wait_all_tasks_blocked()  # write-behind done
        adapter = mock_server.server.l2_tiers[0].adapter
        assert len(adapter.objects) == 2
        l1_bytes = mock_server.engine.l1.ledger.total
        response = await admin_request(
            mock_server, "POST", "/v1/clear", {"cache_salt": "", "include_l2": True}
        )
    assert response.json() == {"entries_removed": 2, "bytes_freed": l1_bytes, "l2_objects_deleted": 2}
    assert adapter.objects == {}


@pytest.mark.parametrize(
    ("raw_body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"salt": "a"}', "unknown fields"),
        (b'{"cache_salt": 5}', "cache_salt must be a string"),
        (b'{"include_l2": "yes"}', "include_l2 must be true or false"),
        (b'{"cache_salt": "a/b"}', "must not contain"),
    ],
)
async def test_clear_rejects_bad_bodies_with_400(server, raw_body, message):
    response = await admin_request(server, "POST", "/v1/clear", raw_body=raw_body)
    assert response.status == 400
    assert message in response.json()["error"]


# ---------------------------------------------------------------- quotas


async def test_quota_put_get_list_and_delete(mock_server):
    put = await admin_request(mock_server, "PUT", "/v1/quota/tenant-a", {"l1": "8MiB", "mock": 500_000_000})
    assert (put.status, put.json()) == (
        200,
        {"salt": "tenant-a", "quota": {"l1": 8 * 1024**2, "mock": 500_000_000}},
    )
    assert mock_server.server.quotas.get("tenant-a") == {"l1": 8 * 1024**2, "mock": 500_000_000}

    listed = await admin_request(mock_server, "GET", "/v1/quota")
    assert listed.json() == {
        "tiers": ["l1", "mock"],
        "quotas": {"tenant-a": {"l1": 8 * 1024**2, "mock": 500_000_000}},
    }

    one = await admin_request(mock_server, "DELETE", "/v1/quota/tenant-a?tier=mock")
    assert one.json() == {"salt": "tenant-a", "deleted": "mock", "quota": {"l1": 8 * 1024**2}}
    every = await admin_request(mock_server, "DELETE", "/v1/quota/tenant-a")
    assert every.json() == {"salt": "tenant-a", "deleted": "all", "quota": {}}
    gone = await admin_request(mock_server, "GET", "/v1/quota/tenant-a")
    assert gone.status == 404
    assert "no quota set for tenant-a" in gone.json()["error"]


async def test_put_merges_tiers_into_the_existing_quota(mock_server):
    await admin_request(mock_server, "PUT", "/v1/quota/t", {"l1": 1000})
    merged = await admin_request(mock_server, "PUT", "/v1/quota/t", {"mock": "2KB"})
    assert merged.json()["quota"] == {"l1": 1000, "mock": 2000}


async def test_get_of_a_salt_returns_its_usage_in_every_tier(mock_server, kv):
    async with await AsyncClient.connect(mock_server.url) as client:
        await client.register_kv_cache("w", kv)
        await store(client, 2, salt="tenant-a")
        await trio.testing.wait_all_tasks_blocked()  # write-behind done
    await admin_request(mock_server, "PUT", "/v1/quota/tenant-a", {"l1": "8MiB"})
    answer = (await admin_request(mock_server, "GET", "/v1/quota/tenant-a")).json()
    l2 = mock_server.server.l2_tiers[0]
    assert answer == {
        "salt": "tenant-a",
        "quota": {"l1": 8 * 1024**2},
        "usage": {
            "l1": mock_server.engine.l1.ledger.salt_bytes("tenant-a"),
            "mock": l2.ledger.salt_bytes("tenant-a"),
        },
    }
    assert answer["usage"]["mock"] == 2 * 2 * len(kv.block_bytes(0))


async def test_the_empty_salt_is_spelled_at_empty(server):
    response = await admin_request(server, "PUT", "/v1/quota/@empty", {"l1": "1MiB"})
    assert response.json() == {"salt": "@empty", "quota": {"l1": 1024**2}}
    assert server.server.quotas.get("") == {"l1": 1024**2}
    got = (await admin_request(server, "GET", "/v1/quota/@empty")).json()
    assert got["usage"] == {"l1": 0}


async def test_the_default_quota_is_spelled_at_default_and_has_no_usage(server):
    await admin_request(server, "PUT", "/v1/quota/@default", {"l1": "2MiB"})
    assert server.server.quotas.limit("l1", "anyone") == 2 * 1024**2
    got = (await admin_request(server, "GET", "/v1/quota/@default")).json()
    assert got == {"salt": "@default", "quota": {"l1": 2 * 1024**2}, "usage": None}
    listed = (await admin_request(server, "GET", "/v1/quota")).json()
    assert listed["quotas"] == {"@default": {"l1": 2 * 1024**2}}
    deleted = await admin_request(server, "DELETE", "/v1/quota/@default")
    assert deleted.status == 200
    assert server.server.quotas.limit("l1", "anyone") is None


@pytest.mark.parametrize(
    ("raw_body", "message"),
    [
        (b'{"l1": -1}', "negative"),
        (b'{"l1": NaN}', "not a byte count"),
        (b'{"l1": Infinity}', "not a byte count"),
        (b'{"l1": 1.5}', "not a byte count"),
        (b'{"l1": "lots"}', "not a size"),
        (b'{"l1": "-5GiB"}', "not a size"),
        (b'{"l1": true}', "not a byte count"),
        (b'{"l1": null}', "not a byte count"),
        (b'{"l1": [1]}', "not a byte count"),
        (b'{"l1": 1e300}', "at most 9223372036854775807"),
        (b'{"l1": 9223372036854775808}', "at most 9223372036854775807"),
        (b'{"l9": 1}', "unknown tier"),
        (b"{}", "at least one tier"),
        (b'["l1", 1]', "JSON object"),
        (b'"8GiB"', "JSON object"),
        (b"", "body is required"),
        (b"{'l1': 1}", "not JSON"),
    ],
)
async def test_bad_quota_values_are_400_and_change_nothing(server, raw_body, message):
    await admin_request(server, "PUT", "/v1/quota/t", {"l1": 4096})
    response = await admin_request(server, "PUT", "/v1/quota/t", raw_body=raw_body)
    assert response.status == 400
    assert message in response.json()["error"]
    assert server.server.quotas.get("t") == {"l1": 4096}


async def test_a_partly_bad_quota_changes_nothing(mock_server):
    response = await admin_request(mock_server, "PUT", "/v1/quota/t", {"l1": 4096, "mock": -1})
    assert response.status == 400
    assert mock_server.server.quotas.all() == {}


@pytest.mark.parametrize("name", ["a%5Cb", "x" * 129, "%00", "a%2Fb"])
async def test_bad_salts_in_the_url_are_400(server, name):
    response = await admin_request(server, "PUT", f"/v1/quota/{name}", {"l1": 1})
    assert response.status == 400
    assert "bad salt" in response.json()["error"]


async def test_delete_of_a_salt_without_a_quota_is_404_and_of_an_unknown_tier_400(server):
    assert (await admin_request(server, "DELETE", "/v1/quota/nobody")).status == 404
    await admin_request(server, "PUT", "/v1/quota/t", {"l1": 1})
    assert (await admin_request(server, "DELETE", "/v1/quota/t?tier=mock")).status == 400
    assert (await admin_request(server, "DELETE", "/v1/quota/t?color=red")).status == 400
    assert server.server.quotas.get("t") == {"l1": 1}


async def test_quotas_set_over_http_persist_to_the_quota_file(tmp_path):
    path = tmp_path / "quotas.json"
    async with running_server(quota_file=str(path)) as running:
        await admin_request(running, "PUT", "/v1/quota/@empty", {"l1": "1MiB"})
    assert json.loads(path.read_text())["quotas"] == {"@empty": {"l1": 1024**2}}
    async with running_server(quota_file=str(path)) as running:
        assert (await admin_request(running, "GET", "/v1/quota/@empty")).json()["quota"] == {"l1": 1024**2}


async def test_a_quota_that_cannot_be_saved_is_500_and_still_in_force(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    async with running_server(quota_file=str(blocker / "quotas.json")) as running:
        answer = await admin_request(running, "PUT", "/v1/quota/t", {"l1": "1MiB"})
        assert answer.status == 500
        assert "could not be saved" in answer.json()["error"]
        assert running.server.quotas.get("t") == {"l1": 1024**2}


# ---------------------------------------------------------------- paths and methods


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/statuses", "/v1/quota/", "/v1/quota/a/b", "/metrics/x"])
async def test_unknown_paths_are_404_with_a_json_error(server, path):
    response = await admin_request(server, "GET", path)
    assert response.status == 404
    assert "no such endpoint" in response.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/healthz", "GET"),
        ("DELETE", "/v1/status", "GET"),
        ("PUT", "/metrics", "GET"),
        ("GET", "/v1/clear", "POST"),
        ("POST", "/v1/quota", "GET"),
        ("POST", "/v1/quota/t", "DELETE, GET, PUT"),
    ],
)
async def test_wrong_methods_are_405_with_allow(server, method, path, allow):
    response = await admin_request(server, method, path, raw_body=b"{}" if method != "GET" else None)
    assert response.status == 405
    assert response.headers["allow"] == allow
    assert "not allowed" in response.json()["error"]


# ---------------------------------------------------------------- token


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/v1/clear", {}), ("PUT", "/v1/quota/t", {"l1": 1}), ("DELETE", "/v1/quota/t", None)],
)
async def test_with_a_token_mutating_endpoints_need_it(token_server, method, path, body):
    await admin_request(token_server, "PUT", "/v1/quota/t", {"l1": 5}, token=TOKEN)
    for token in (None, "wrong", TOKEN + "x", ""):
        response = await admin_request(token_server, method, path, body, token=token)
        assert response.status == 401
        assert "admin token" in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert token_server.server.quotas.get("t") == {"l1": 5}  # nothing changed
    response = await admin_request(token_server, method, path, body, token=TOKEN)
    assert response.status == 200


async def test_with_a_token_reads_stay_open(token_server):
    await admin_request(token_server, "PUT", "/v1/quota/t", {"l1": 5}, token=TOKEN)
    for path in ("/healthz", "/v1/status", "/metrics", "/v1/quota", "/v1/quota/t"):
        assert (await admin_request(token_server, "GET", path)).status == 200, path


async def test_without_a_token_mutating_endpoints_are_open(server):
    assert (await admin_request(server, "PUT", "/v1/quota/t", {"l1": 5})).status == 200
    assert (await admin_request(server, "POST", "/v1/clear")).status == 200


def test_the_token_comes_from_the_environment_too():
    from trio_kv.server.config import load_config

    config = load_config(environ={"TRIO_KV_ADMIN_TOKEN": TOKEN})
    assert config.admin_token == TOKEN


async def test_an_oversized_body_is_413(server):
    response = await admin_request(server, "PUT", "/v1/quota/t", raw_body=b" " * (65 * 1024))
    assert response.status == 413


async def test_a_kv_cache_registered_through_the_fixture_shows_in_status(client, server):
    status = (await admin_request(server, "GET", "/v1/status")).json()
    assert [i["instance_id"] for i in status["instances"]] == ["worker-0"]


async def test_many_concurrent_admin_requests_are_all_answered(server):
    results: list[int] = []

    async def one() -> None:
        results.append((await admin_request(server, "GET", "/v1/status")).status)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert results == [200] * 20
