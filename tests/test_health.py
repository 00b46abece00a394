"""Health is honest: a missing bucket keeps its tier unhealthy and stops a start with exit 2,
a full disk is logged once per change, and liveness (/healthz) is apart from readiness (/readyz)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

import pytest
import trio

from trio_kv.adapters import AdapterError, fs_io
from trio_kv.adapters.breaker import BreakerState
from trio_kv.adapters.fs import FsAdapter
from trio_kv.adapters.s3 import BreakerOpen, S3Adapter
from trio_kv.core.l2_tier import L2Tier
from trio_kv.testing import admin_request, running_server

from .s3_server import S3TestServer, running_s3_server, use_fake_credentials
from .test_s3_adapter import key, payload


@pytest.fixture
def own_server(monkeypatch: pytest.MonkeyPatch):
    use_fake_credentials(monkeypatch)
    with running_s3_server() as server:
        yield server


def s3_tier(server: S3TestServer, bucket: str) -> L2Tier[S3Adapter]:
    adapter = S3Adapter(
        bucket,
        endpoint_url=server.endpoint_url,
        breaker_failures=2,
        breaker_cooldown_s=0.2,
        connect_timeout_s=1.0,
    )
    adapter.retry_base_s = 0.001
    return L2Tier(adapter)


def remove_bucket(server: S3TestServer, bucket: str) -> None:
    client = server.client()
    for name in server.object_names(bucket):
        client.delete_object(Bucket=bucket, Key=name)
    client.delete_bucket(Bucket=bucket)


# ------------------------------------------------------------ a missing bucket


async def test_an_endpoint_back_without_its_bucket_keeps_the_tier_unhealthy(own_server):
    bucket = own_server.create_bucket()
    tier = s3_tier(own_server, bucket)
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)
        await tier.put(key(1), payload(1))
        own_server.stop()
        with pytest.raises(AdapterError):
            await tier.put(key(2), payload(2))  # connection failures open the breaker
        own_server.start()
        remove_bucket(own_server, bucket)
        with trio.fail_after(10):
            # The background probe (HeadBucket) answers 404: that is no success.
            while "bucket missing" not in tier.health().reason:
                if await tier.adapter.wait_breaker_change() is BreakerState.CLOSED:
                    break
        health = tier.health()
        assert not health.healthy and health.reason.startswith("bucket missing")
        assert tier.adapter.breaker.state is not BreakerState.CLOSED
        with pytest.raises(BreakerOpen):
            await tier.put(key(3), payload(3))  # not sent
        own_server.create_bucket(bucket)
        with trio.fail_after(10):
            await tier.adapter.wait_breaker_closed()
        assert tier.health().healthy
        assert await tier.put(key(3), payload(3))
        nursery.cancel_scope.cancel()


async def test_a_put_to_a_deleted_bucket_marks_the_tier_unhealthy_and_sends_no_more(own_server):
    bucket = own_server.create_bucket()
    tier = s3_tier(own_server, bucket)
    await tier.put(key(1), payload(1))
    remove_bucket(own_server, bucket)
    with pytest.raises(AdapterError, match="does not exist"):
        await tier.put(key(2), payload(2))
    health = tier.health()
    assert not health.healthy and health.reason.startswith("bucket missing")
    with pytest.raises(BreakerOpen):
        await tier.put(key(3), payload(3))


def test_serve_with_a_missing_bucket_exits_2_naming_the_l2_setting(own_server, tmp_path):
    spec = f"s3://no-such-bucket/kv?endpoint={own_server.endpoint_url}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_KV_")}
    command = [sys.executable, "-m", "trio_kv", "serve", "--no-admin", "--l1-size", "16MiB"]
    command += ["--listen", f"ipc://{tmp_path}/kv.sock", "--l2", spec]
    out = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"trio-kv serve: --l2 {spec}: ")
    assert "'no-such-bucket' does not exist" in last


# ------------------------------------------------------------ a full disk


def disk_full(fd, data, offset):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


async def test_a_full_disk_is_logged_once_when_it_fills_and_once_when_it_clears(
    tmp_path, monkeypatch, caplog
):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    caplog.set_level(logging.INFO, logger="trio_kv")
    monkeypatch.setattr(fs_io, "pwrite_all", disk_full)
    for n in range(3):
        with pytest.raises(AdapterError):
            await tier.put(key(n), payload(n))
    full = [r for r in caplog.records if "disk-full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.ERROR
    monkeypatch.undo()
    await tier.put(key(1), payload(1))
    await tier.put(key(2), payload(2))
    cleared = [r for r in caplog.records if "writable again" in r.getMessage()]
    assert len(cleared) == 1


async def test_a_disk_tier_without_a_capacity_warns_at_start(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="trio_kv")
    for capacity in (None, 1 << 20):
        async with trio.open_nursery() as nursery:
            await nursery.start(L2Tier(FsAdapter(str(tmp_path)), capacity=capacity).run)
            nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if "no capacity set" in r.getMessage()]
    assert len(warnings) == 1


# ------------------------------------------------------------ liveness and readiness


async def test_an_unhealthy_tier_degrades_liveness_and_fails_readiness(tmp_path, monkeypatch):
    async with running_server(l2=[f"fs:{tmp_path}"]) as running:
        adapter = running.server.l2_tiers[0].adapter
        monkeypatch.setattr(fs_io, "pwrite_all", disk_full)
        with pytest.raises(AdapterError):
            await running.server.l2_tiers[0].put(key(1), payload(1))
        live = await admin_request(running, "GET", "/healthz")
        assert live.status == 200  # L1 serves: a restart would not mend the disk
        assert live.json()["status"] == "degraded"
        assert live.json()["reasons"] == [f"{adapter.name}: disk-full: {adapter.health().reason}"]
        ready = await admin_request(running, "GET", "/readyz")
        assert ready.status == 503
        assert ready.json() == {"status": "unhealthy", "reasons": live.json()["reasons"]}
        monkeypatch.undo()
        await running.server.l2_tiers[0].put(key(2), payload(2))
        assert (await admin_request(running, "GET", "/healthz")).json() == {"status": "ok"}
        assert (await admin_request(running, "GET", "/readyz")).status == 200
