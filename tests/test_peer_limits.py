"""Bounded memory per peer: ids have a length limit, hash sessions a byte budget, the memory
the server holds is reported, and an fs tier never creates a directory nobody asked for."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from trio_kv.adapters.fs import FsAdapter
from trio_kv.client import AsyncClient
from trio_kv.core.sessions import HashSessions
from trio_kv.errors import ErrorCode, ServerError
from trio_kv.keys import RequestKey
from trio_kv.server.config import ConfigError, load_config
from trio_kv.testing import admin_request, running_server

from .conftest import BLOCK_SIZE, CHUNK_SIZE


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n)]


@pytest.fixture
async def client_on(kv):
    async with (
        running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB", max_id_chars=64) as running,
        await AsyncClient.connect(running.url) as client,
    ):
        await client.register_kv_cache("w", kv)
        yield running, client


async def test_a_request_id_over_the_limit_is_refused_everywhere_and_nothing_is_kept(client_on):
    running, client = client_on
    long_id = "r" * 65
    key = RequestKey("m", 1, 0, tokens(CHUNK_SIZE), request_id=long_id)
    blocks = list(range(CHUNK_SIZE // BLOCK_SIZE))
    calls = [
        client.lookup(key),
        client.store("w", key, blocks),
        client.retrieve("w", key, blocks),
        client.release(long_id),
        client.end_session(long_id),
    ]
    for call in calls:
        with pytest.raises(ServerError) as caught:
            await call
        assert caught.value.code == ErrorCode.LIMIT_EXCEEDED
    assert len(running.engine.sessions) == 0 and len(running.engine.leases) == 0
    ok = await client.lookup(RequestKey("m", 1, 0, tokens(CHUNK_SIZE), request_id="r" * 64))
    assert ok.hit_tokens == 0 and len(running.engine.sessions) == 1


async def test_a_model_name_over_the_limit_is_refused(client_on):
    _, client = client_on
    with pytest.raises(ServerError) as caught:
        await client.lookup(RequestKey("m" * 65, 1, 0, tokens(CHUNK_SIZE)))
    assert caught.value.code == ErrorCode.LIMIT_EXCEEDED


def test_hash_sessions_stay_within_their_byte_budget():
    sessions = HashSessions(CHUNK_SIZE, ttl=600, max_sessions=10_000, clock=lambda: 0.0, max_bytes=200_000)
    for i in range(100):  # each session holds 16 chunks of packed tokens: ~16 KiB
        sessions.hashes(
            RequestKey("m", 1, 0, tokens(16 * CHUNK_SIZE, i), request_id=f"r{i}"), 16 * CHUNK_SIZE
        )
        assert sessions.nbytes <= 200_000
    assert 5 <= len(sessions) < 100  # least recent dropped, the recent ones kept
    newest = RequestKey("m", 1, 0, tokens(16 * CHUNK_SIZE, 99), request_id="r99")
    before = sessions.chunks_hashed
    sessions.hashes(newest, 16 * CHUNK_SIZE)
    assert sessions.chunks_hashed == before  # still cached: nothing hashed again
    sessions.clear()
    assert sessions.nbytes == 0


async def test_status_and_metrics_report_session_bytes_and_the_memory_estimate(kv):
    async with (
        running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB", max_session_bytes="16KiB") as running,
        await AsyncClient.connect(running.url) as client,
    ):
        for i in range(20):
            await client.lookup(RequestKey("m", 1, 0, tokens(8 * CHUNK_SIZE, i), request_id=f"r{i}"))
        status = await client.status()
        metrics = (await admin_request(running, "GET", "/metrics")).body.decode()
    assert 0 < status.session_bytes <= 16 * 1024
    assert status.sessions < 20
    assert status.memory_bytes["l1_arena"] == 16 * 1024**2
    assert status.memory_bytes["sessions"] == status.session_bytes
    assert f"trio_kv_session_bytes {float(status.session_bytes)}" in metrics
    assert 'trio_kv_memory_estimate_bytes{part="l1_arena"} 1.6777216e+07' in metrics


def test_an_fs_tier_on_a_missing_directory_is_refused_unless_create_is_given(tmp_path):
    missing = tmp_path / "typo" / "kv"
    with pytest.raises(ConfigError, match=r"does not exist; create it first or add \?create=true"):
        load_config(overrides={"l2": [f"fs:{missing}"]})
    assert not missing.exists()
    config = load_config(overrides={"l2": [f"fs:{missing}?create=true"]})
    assert config.l2_specs()[0].options["create"] is True


def test_serve_on_a_missing_fs_directory_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nope"
    done = subprocess.run(
        [sys.executable, "-m", "trio_kv", "serve", "--no-admin", "--l2", f"fs:{missing}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "create=true" in done.stderr
    assert not missing.exists()


async def test_an_fs_adapter_without_create_reports_the_missing_root_and_makes_nothing(tmp_path):
    missing = tmp_path / "absent"
    adapter = FsAdapter(str(missing), create=False)
    assert [item async for item in adapter.scan()] == []
    health = adapter.health()
    assert not health.healthy and health.state == "missing"
    assert not missing.exists()
