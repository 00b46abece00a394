"""`trio-kv status` and `trio-kv quota` against a running in-process server. The CLI runs in a
worker thread (it blocks on urllib) while the server keeps serving on the test's Trio loop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import trio
import trio.testing

from trio_kv.cli import main
from trio_kv.client import AsyncClient
from trio_kv.keys import RequestKey
from trio_kv.testing import running_server
from trio_kv.tools.admin_cli import render_status

from .conftest import BLOCK_SIZE, CHUNK_SIZE

TOKEN = "cli-token"
TRIO_KV = [sys.executable, "-m", "trio_kv"]


async def trio_kv(*argv: str) -> int:
    return await trio.to_thread.run_sync(main, list(argv))


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIO_KV_")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def busy_server(kv):
    """A server with an L2 tier, two tenants' chunks, lookups and a quota."""
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB", l2=["mock:?capacity=1MiB"]) as running:
        async with await AsyncClient.connect(running.url) as client:
            await client.register_kv_cache("w", kv)
            for salt, n_chunks in (("tenant-a", 3), ("", 1)):
                prompt = list(range(n_chunks * CHUNK_SIZE))
                blocks = list(range(n_chunks * CHUNK_SIZE // BLOCK_SIZE))
                await client.store("w", RequestKey("m", 1, 0, prompt, cache_salt=salt), blocks)
                await client.lookup(RequestKey("m", 1, None, prompt + prompt, cache_salt=salt))
            await trio.testing.wait_all_tasks_blocked()
        running.server.quotas.set("tenant-a", {"l1": "1MiB"})
        yield running


# ---------------------------------------------------------------- status


async def test_status_shows_tiers_tenants_usage_bars_and_hit_rates(busy_server, capsys):
    assert await trio_kv("status", "--url", busy_server.admin_url) == 0
    screen = capsys.readouterr().out
    assert screen.startswith("trio-kv ")
    assert busy_server.admin_url in screen
    lines = screen.splitlines()
    tier_rows = {line.split()[0]: line for line in lines if line.startswith(("l1 ", "mock "))}
    assert set(tier_rows) == {"l1", "mock"}
    assert "[#" in tier_rows["mock"] or "[-" in tier_rows["mock"]  # a bar against its 1 MiB capacity
    assert "/ 1.0 MiB" in tier_rows["mock"]
    salt_rows = [line for line in lines if line.startswith(("tenant-a ", "@empty "))]
    assert any("1.0 MiB" in row for row in salt_rows if row.startswith("tenant-a") and " l1 " in row)
    assert any("no quota" in row for row in salt_rows if row.startswith("@empty"))
    rates = {
        line.split()[0]: line.split()[-1]
        for line in lines
        if line.startswith(("tenant-a ", "@empty ", "all "))
    }
    assert rates["all"] == "50.0%"  # every lookup asked twice what was stored


async def test_status_json_prints_the_raw_status(busy_server, capsys):
    assert await trio_kv("status", "--json", "--url", busy_server.admin_url) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["traffic"]["by_salt"]["tenant-a"]["l1_hit_tokens"] == 3 * CHUNK_SIZE
    assert status["quotas"] == {"tenant-a": {"l1": 1024**2}}
    assert [tier["name"] for tier in status["l2"]] == ["mock"]


def test_status_of_an_unreachable_server_exits_1_with_a_message(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--url", url, "--timeout", "5"]) == 1
    assert f"cannot reach the admin API at {url}" in capsys.readouterr().err


def test_status_renders_an_unhealthy_tier_and_an_unbounded_one():
    usage = {"total_bytes_used": 0, "total_capacity_bytes": None, "bytes_by_salt": {}, "usage_fraction": -1.0}
    tier = {
        "name": "s3://bucket",
        "usage": usage,
        "healthy": False,
        "state": "breaker-open",
        "reason": "endpoint down",
        "queue_depth": 7,
        "written": 0,
        "dropped": 3,
    }
    status = {
        "version": "0.1.0",
        "uptime_s": 3725.0,
        "chunk_size": 256,
        "l1": {**usage, "total_capacity_bytes": 1024**3, "usage_fraction": 0.0},
        "l1_entries": 0,
        "leases": 0,
        "sessions": 0,
        "instances": [],
        "requests_in_flight": 0,
        "l2": [tier],
    }
    screen = render_status(status)
    assert "up 1h 02m" in screen
    [row] = [line for line in screen.splitlines() if line.startswith("s3://bucket")]
    assert "BREAKER-OPEN endpoint down" in row
    assert "unbounded" in row
    assert "dropped 3" in row


# ---------------------------------------------------------------- quota


async def test_quota_set_get_list_delete_round_trip(busy_server, capsys):
    url = ("--url", busy_server.admin_url)
    quotas = busy_server.server.quotas
    assert await trio_kv("quota", "set", "tenant-b", "l1=8MiB", "mock=500000", *url) == 0
    assert capsys.readouterr().out.strip() == "tenant-b: l1 8.0 MiB, mock 488.3 KiB"
    assert quotas.get("tenant-b") == {"l1": 8 * 1024**2, "mock": 500_000}

    assert await trio_kv("quota", "get", "tenant-a", *url) == 0
    shown = capsys.readouterr().out
    assert shown.splitlines()[0] == "tenant-a"
    [l1_row] = [line for line in shown.splitlines() if line.split()[0] == "l1"]
    assert "1.0 MiB" in l1_row and "%" in l1_row  # quota, usage and the share used

    assert await trio_kv("quota", "list", *url) == 0
    listed = capsys.readouterr().out
    assert "tenant-a  l1 1.0 MiB" in listed
    assert "tenant-b  l1 8.0 MiB, mock 488.3 KiB" in listed

    assert await trio_kv("quota", "delete", "tenant-b", "--tier", "mock", *url) == 0
    assert capsys.readouterr().out.strip() == "tenant-b: deleted the mock quota"
    assert quotas.get("tenant-b") == {"l1": 8 * 1024**2}
    assert await trio_kv("quota", "delete", "tenant-b", *url) == 0
    assert capsys.readouterr().out.strip() == "tenant-b: deleted every quota"
    assert quotas.get("tenant-b") == {}


async def test_quota_names_the_empty_salt_and_the_default(busy_server, capsys):
    url = ("--url", busy_server.admin_url)
    assert await trio_kv("quota", "set", "@empty", "l1=2MiB", *url) == 0
    assert await trio_kv("quota", "set", "@default", "mock=100KB", *url) == 0
    assert busy_server.server.quotas.get("") == {"l1": 2 * 1024**2}
    assert busy_server.server.quotas.limit("mock", "someone") == 100_000
    capsys.readouterr()
    assert await trio_kv("quota", "get", "@empty", "--json", *url) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["salt"] == "@empty"
    assert answer["usage"]["l1"] == busy_server.engine.l1.ledger.salt_bytes("")


async def test_quota_get_of_a_salt_without_a_quota_exits_1(busy_server, capsys):
    assert await trio_kv("quota", "get", "nobody", "--url", busy_server.admin_url) == 1
    assert "HTTP 404: no quota set for nobody" in capsys.readouterr().err


async def test_a_bad_size_is_refused_by_the_server_and_exits_1(busy_server, capsys):
    assert await trio_kv("quota", "set", "t", "l1=-5", "--url", busy_server.admin_url) == 1
    assert "HTTP 400" in capsys.readouterr().err
    assert busy_server.server.quotas.get("t") == {}


@pytest.mark.parametrize("action", [("set", "l1=1MiB"), ("get",), ("delete",)])
async def test_a_salt_with_a_slash_is_a_bad_salt_not_an_unknown_endpoint(busy_server, capsys, action):
    assert await trio_kv("quota", action[0], "bad/salt", *action[1:], "--url", busy_server.admin_url) == 1
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "bad salt" in err and "must not contain '/'" in err


@pytest.mark.parametrize("item", ["l1", "=8GiB", "l1="])
def test_a_malformed_tier_size_is_a_usage_error(item, capsys):
    # Never reaches a server: the port is closed.
    assert main(["quota", "set", "t", item, "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "is not TIER=SIZE" in capsys.readouterr().err


def test_missing_arguments_are_usage_errors():
    with pytest.raises(SystemExit) as exited:
        main(["quota", "set", "t"])
    assert exited.value.code == 2


async def test_the_token_comes_from_the_flag_or_the_environment(capsys, monkeypatch):
    async with running_server(admin_token=TOKEN) as running:
        url = ("--url", running.admin_url)
        assert await trio_kv("quota", "set", "t", "l1=1MiB", *url) == 1
        assert "HTTP 401" in capsys.readouterr().err
        assert await trio_kv("quota", "set", "t", "l1=1MiB", "--token", TOKEN, *url) == 0
        monkeypatch.setenv("TRIO_KV_ADMIN_TOKEN", TOKEN)
        assert await trio_kv("quota", "delete", "t", *url) == 0
        assert await trio_kv("status", *url) == 0  # reads need no token either way


# ---------------------------------------------------------------- serve flags


def test_serve_flags_set_the_admin_address_token_and_switch():
    out = subprocess.run(
        [
            *TRIO_KV,
            "serve",
            "--print-config",
            "--admin",
            "0.0.0.0:9000",
            "--admin-token",
            "t0k",
            "--no-admin",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    )
    config = json.loads(out.stdout)
    assert (config["admin"], config["admin_token"], config["no_admin"]) == ("0.0.0.0:9000", "t0k", True)


def test_serve_exits_1_with_a_clear_message_when_the_admin_port_is_taken(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run(
            [*TRIO_KV, "serve", "--listen", f"ipc://{tmp_path}/kv.sock", "--admin", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
    assert out.returncode == 1
    assert f"admin HTTP cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "kv.sock").exists()
