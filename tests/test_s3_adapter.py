"""The S3 adapter against a real S3 endpoint on loopback (moto's server, see s3_server.py)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import trio
import trio.testing
from botocore.awsrequest import AWSResponse

from trio_kv.adapters import AdapterError
from trio_kv.adapters.base import Hit
from trio_kv.adapters.breaker import BreakerState
from trio_kv.adapters.s3 import MIN_PART_SIZE, BreakerOpen, S3Adapter
from trio_kv.adapters.spec import parse_spec
from trio_kv.core.l2_tier import L2Tier
from trio_kv.keys import ObjectKey

from .s3_server import (  # noqa: F401
    S3Bucket,
    S3TestServer,
    running_s3_server,
    s3_bucket_fixture,
    s3_server_fixture,
    use_fake_credentials,
)

SIZE = 4096
LONG_MODEL = "org/" + "m" * 296  # 300 characters: stored under a digest name


def key(n: int, salt: str = "", model: str = "llama") -> ObjectKey:
    return ObjectKey(model, 1, 0, n.to_bytes(16, "little"), salt)


def payload(n: int, size: int = SIZE) -> memoryview:
    """A slice of a torch uint8 tensor, as L1 hands out."""
    generator = torch.Generator().manual_seed(n)
    arena = torch.randint(0, 256, (size + 64,), dtype=torch.uint8, generator=generator)
    return memoryview(arena.numpy())[64:]


def empty(size: int = SIZE) -> memoryview:
    return memoryview(torch.zeros(size, dtype=torch.uint8).numpy())


TIER_SETTINGS = ("capacity", "high_watermark", "low_watermark")


@pytest.fixture
def make_tier(s3_bucket: S3Bucket) -> Iterator[Callable[..., L2Tier[S3Adapter]]]:
    """An L2 tier over a fresh S3Adapter; capacity and watermarks go to the tier."""

    def make(**settings: Any) -> L2Tier[S3Adapter]:
        settings.setdefault("prefix", "kv/")
        tier_settings = {k: settings.pop(k) for k in TIER_SETTINGS if k in settings}
        adapter = S3Adapter(s3_bucket.bucket, endpoint_url=s3_bucket.endpoint_url, **settings)
        adapter.retry_base_s = 0.005
        return L2Tier(adapter, **tier_settings)

    yield make


@pytest.fixture
def tier(make_tier: Callable[..., L2Tier[S3Adapter]]) -> L2Tier[S3Adapter]:
    return make_tier()


def count_requests(tier: L2Tier[S3Adapter]) -> Counter[str]:
    """Every HTTP request the adapter's client sends, by operation name."""
    sent: Counter[str] = Counter()

    def on_send(event_name: str, **kwargs: Any) -> None:
        sent[event_name.rsplit(".", 1)[1]] += 1

    tier.adapter.client.meta.events.register("before-send.s3", on_send)
    return sent


def names(bucket: S3Bucket, prefix: str = "kv/") -> list[str]:
    return bucket.server.object_names(bucket.bucket, prefix)


def assert_settled(tier: L2Tier[S3Adapter]) -> None:
    assert tier.pinned() == 0
    assert tier.adapter.limiter.borrowed_tokens == 0


# ------------------------------------------------------------ the basics


async def test_put_then_get_into_returns_the_same_bytes(tier):
    assert await tier.put(key(1), payload(1))
    buffer = empty()
    assert await tier.get_into(key(1), buffer)
    assert bytes(buffer) == bytes(payload(1))


async def test_an_object_carries_the_layout_fingerprint_of_its_kv_cache(tier):
    await tier.put(key(1), payload(1), "0123456789abcdef")
    await tier.put(key(2), payload(2))
    assert await tier.get_into(key(1), empty()) == Hit("0123456789abcdef")
    assert await tier.get_into(key(2), empty()) == Hit("")  # as objects written before layouts


async def test_a_second_put_of_a_present_key_sends_nothing_and_counts_nothing(tier):
    sent = count_requests(tier)
    assert await tier.put(key(1), payload(1))
    assert not await tier.put(key(1), payload(1))
    assert sent["PutObject"] == 1
    assert tier.usage().total_bytes_used == SIZE


async def test_contains_says_which_keys_are_in_the_bucket(tier):
    await tier.put(key(1), payload(1))
    await tier.put(key(3), payload(3))
    sent = count_requests(tier)
    assert await tier.contains([key(1), key(2), key(3)]) == [True, False, True]
    assert sent["HeadObject"] == 3


async def test_delete_removes_objects_from_the_bucket(tier, s3_bucket):
    for n in range(4):
        await tier.put(key(n), payload(n))
    sent = count_requests(tier)
    assert await tier.delete([key(0)]) == 1
    assert await tier.delete([key(1), key(2), key(9)]) == 3  # one batch; an absent key is no error
    assert sent == {"DeleteObject": 1, "DeleteObjects": 1}
    assert names(s3_bucket) == [tier.adapter.object_name(key(3))]
    assert tier.usage().total_bytes_used == SIZE


async def test_the_ledger_counts_bytes_per_salt_exactly(tier):
    await tier.put(key(1, "a"), payload(1, 1000))
    await tier.put(key(2, "a"), payload(2, 3000))
    await tier.put(key(3, "b"), payload(3, 500))
    await tier.put(key(4), payload(4, 7))
    assert tier.usage().bytes_by_salt == {"a": 4000, "b": 500, "": 7}
    await tier.delete([key(1, "a"), key(3, "b")])
    assert tier.usage().bytes_by_salt == {"a": 3000, "": 7}
    assert tier.usage().total_bytes_used == 3007


async def test_objects_carry_their_key_record_and_are_named_by_the_codec(tier, s3_bucket):
    await tier.put(key(1, "tenant"), payload(1))
    (name,) = names(s3_bucket)
    assert name == "kv/v1/s_tenant/m_llama/1x0/01/01000000000000000000000000000000"
    metadata = s3_bucket.server.client().head_object(Bucket=s3_bucket.bucket, Key=name)["Metadata"]
    assert "trio-kv-key" in metadata


async def test_an_object_of_another_length_is_a_miss(tier):
    await tier.put(key(1), payload(1))
    assert not await tier.get_into(key(1), empty(SIZE + 1))
    assert not await tier.get_into(key(1), empty(SIZE - 1))
    assert tier.usage().total_bytes_used == 0  # the ledger no longer counts what is not there


async def test_a_missing_object_is_a_miss(tier):
    assert not await tier.get_into(key(7), empty())
    assert_settled(tier)


# ------------------------------------------------------------ recovery


async def test_a_new_adapter_on_the_same_prefix_recovers_identical_usage(make_tier, s3_bucket):
    first = make_tier()
    await first.put(key(1, "a"), payload(1, 1000))
    await first.put(key(2, "b"), payload(2, 2000))
    await first.put(key(3, "b", model=LONG_MODEL), payload(3, 3000))
    assert any("/md_" in name for name in names(s3_bucket))  # the long model name is a digest
    await make_tier(prefix="other/").put(key(4), payload(4))  # another prefix: not ours
    s3_bucket.server.client().put_object(Bucket=s3_bucket.bucket, Key="kv/notes.txt", Body=b"foreign")

    second = make_tier()
    assert await second.recover() == 3
    assert second.usage() == first.usage()
    assert second.ledger.size_of(key(3, "b", model=LONG_MODEL)) == 3000
    assert second.adapter.foreign_objects == 1
    buffer = empty(3000)
    assert await second.get_into(key(3, "b", model=LONG_MODEL), buffer)
    assert bytes(buffer) == bytes(payload(3, 3000))


async def test_recovery_lists_every_page(make_tier):
    first = make_tier()
    for n in range(5):
        await first.put(key(n), payload(n, 10))
    second = make_tier()
    second.adapter.list_page_size = 2
    sent = count_requests(second)
    assert await second.recover() == 5
    assert sent["ListObjectsV2"] == 3
    assert second.usage().total_bytes_used == 50


# ------------------------------------------------------------ large objects


async def test_large_objects_go_up_in_parts_and_come_back_in_ranges(make_tier, s3_bucket):
    tier = make_tier(multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE)
    size = 2 * MIN_PART_SIZE + 12345
    sent = count_requests(tier)
    assert await tier.put(key(1), payload(1, size))
    buffer = empty(size)
    assert await tier.get_into(key(1), buffer)
    assert bytes(buffer) == bytes(payload(1, size))
    assert sent["UploadPart"] == 3 and sent["CompleteMultipartUpload"] == 1
    assert sent["GetObject"] == 3
    assert not await tier.get_into(key(1), empty(size + 1))  # ranges check the whole length
    uploads = s3_bucket.server.client().list_multipart_uploads(Bucket=s3_bucket.bucket)
    assert not uploads.get("Uploads")


# ------------------------------------------------------------ eviction


async def test_capacity_eviction_deletes_objects_in_the_bucket_and_never_a_pinned_one(make_tier, s3_bucket):
    tier = make_tier(capacity=4 * SIZE, high_watermark=0.75, low_watermark=0.5)
    down_to_low_watermark = trio.Event()

    def on_remove(event: str, keys: object) -> None:
        if event == "remove" and tier.usage().total_bytes_used <= 2 * SIZE:
            down_to_low_watermark.set()

    tier.ledger.add_key_listener(on_remove)
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)
        await tier.put(key(0), payload(0))
        tier.pin(key(0))  # a lookup is loading it
        for n in (1, 2, 3):
            await tier.put(key(n), payload(n))  # the fourth passes the high watermark
        with trio.fail_after(10):
            await down_to_low_watermark.wait()
        nursery.cancel_scope.cancel()
    assert names(s3_bucket) == sorted(tier.adapter.object_name(k) for k in (key(0), key(3)))
    assert tier.evictions == 2
    tier.unpin(key(0))


# ------------------------------------------------------------ cancellation


class BlockedSend:
    """Holds the tier's next request of one operation in its worker thread until released."""

    def __init__(self, tier: S3Adapter, operation: str) -> None:
        self.entered = trio.Event()
        self._release = threading.Event()
        self._token = trio.lowlevel.current_trio_token()
        tier.adapter.client.meta.events.register(f"before-send.s3.{operation}", self._hold)

    def _hold(self, **kwargs: Any) -> None:
        if not self.entered.is_set():
            trio.from_thread.run_sync(self.entered.set, trio_token=self._token)
            self._release.wait(10)

    def release(self) -> None:
        self._release.set()


async def cancel_when_sent(blocked: BlockedSend, operation: Callable[[], Any]) -> None:
    """Run ``operation``, cancel it once its request is out, then let the request go on."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(operation)
        with trio.fail_after(10):
            await blocked.entered.wait()
        nursery.cancel_scope.cancel()
        blocked.release()


async def test_a_cancelled_put_leaves_the_ledger_and_the_bucket_as_they_were(tier, s3_bucket):
    await tier.put(key(1), payload(1))
    before = tier.usage()
    await cancel_when_sent(BlockedSend(tier, "PutObject"), lambda: tier.put(key(2), payload(2, 1 << 20)))
    assert tier.usage() == before
    assert names(s3_bucket) == [tier.adapter.object_name(key(1))]
    assert_settled(tier)
    assert await tier.put(key(2), payload(2))  # the client still works


async def test_a_cancelled_multipart_put_aborts_its_upload(make_tier, s3_bucket):
    tier = make_tier(multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE)
    big = payload(1, MIN_PART_SIZE + 1)
    await cancel_when_sent(BlockedSend(tier, "UploadPart"), lambda: tier.put(key(1), big))
    assert tier.usage().total_bytes_used == 0
    assert names(s3_bucket) == []
    assert not s3_bucket.server.client().list_multipart_uploads(Bucket=s3_bucket.bucket).get("Uploads")
    assert_settled(tier)


async def test_a_cancelled_get_leaves_the_ledger_and_the_pins_as_they_were(tier):
    await tier.put(key(1), payload(1))
    before = tier.usage()
    buffer = empty()
    await cancel_when_sent(BlockedSend(tier, "GetObject"), lambda: tier.get_into(key(1), buffer))
    assert bytes(buffer) == bytes(SIZE)  # the read stopped before its first byte
    assert tier.usage() == before
    assert_settled(tier)
    assert await tier.get_into(key(1), buffer)


# ------------------------------------------------------------ retries


class _ErrorBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._body


def answer_with(tier: S3Adapter, operation: str, status: int, code: str, times: int) -> list[int]:
    """Make the next ``times`` requests of ``operation`` get an S3 error answer instead of going out."""
    answered = [0]
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>test</Message></Error>".encode()

    def fake(request: Any, **kwargs: Any) -> AWSResponse | None:
        if answered[0] >= times:
            return None
        answered[0] += 1
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _ErrorBody(body))

    tier.adapter.client.meta.events.register(f"before-send.s3.{operation}", fake)
    return answered


@pytest.mark.parametrize(
    ("status", "code"), [(503, "SlowDown"), (429, "TooManyRequests"), (500, "InternalError")]
)
async def test_throttling_and_server_errors_are_retried(tier, status, code):
    answered = answer_with(tier, "PutObject", status, code, times=2)
    assert await tier.put(key(1), payload(1))
    assert answered == [2]
    assert tier.adapter.retries == 2
    assert tier.adapter.breaker.state is BreakerState.CLOSED


async def test_a_call_still_throttled_after_its_retries_fails(make_tier):
    tier = make_tier(max_retries=2)
    answer_with(tier, "PutObject", 503, "SlowDown", times=10)
    with pytest.raises(AdapterError, match="SlowDown"):
        await tier.put(key(1), payload(1))
    assert tier.adapter.retries == 2
    assert tier.usage().total_bytes_used == 0


async def test_an_access_error_is_not_retried(tier):
    answer_with(tier, "PutObject", 403, "AccessDenied", times=10)
    with pytest.raises(AdapterError, match="AccessDenied"):
        await tier.put(key(1), payload(1))
    assert tier.adapter.retries == 0


# ------------------------------------------------------------ the circuit breaker


@pytest.fixture
def own_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3TestServer]:
    """A server of the test's own, to stop and restart."""
    use_fake_credentials(monkeypatch)
    with running_s3_server() as server:
        yield server


def breaker_tier(server: S3TestServer, bucket: str) -> L2Tier[S3Adapter]:
    adapter = S3Adapter(
        bucket,
        prefix="kv/",
        endpoint_url=server.endpoint_url,
        breaker_failures=2,
        breaker_cooldown_s=1.0,  # long enough for the checks made while it is open
        connect_timeout_s=1.0,
        read_timeout_s=2.0,
    )
    adapter.retry_base_s = 0.005
    return L2Tier(adapter)


async def test_the_breaker_opens_when_the_endpoint_dies_and_closes_when_it_is_back(own_server):
    tier = breaker_tier(own_server, own_server.create_bucket())
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)
        await tier.put(key(1), payload(1))

        own_server.stop()
        with pytest.raises(AdapterError):
            await tier.put(key(2), payload(2))
        health = tier.health()
        assert not health.healthy and health.state == "breaker-open"
        assert "connection failures" in health.reason
        assert tier.adapter.breaker.blocking()

        sent = count_requests(tier)
        assert await tier.contains([key(1)]) == [False]
        assert not await tier.get_into(key(1), empty())
        with pytest.raises(BreakerOpen):
            await tier.put(key(3), payload(3))
        assert sum(sent.values()) == 0  # nothing was sent while the breaker was open
        assert key(1) in tier.ledger  # a miss for now, not gone
        assert tier.usage().total_bytes_used == SIZE

        own_server.start()
        with trio.fail_after(10):
            await tier.adapter.wait_breaker_closed()  # the background probe, after the cool-down
        assert sent == {"HeadBucket": 1}
        assert tier.health().healthy
        assert await tier.put(key(3), payload(3))
        buffer = empty()
        assert await tier.get_into(key(1), buffer)
        assert bytes(buffer) == bytes(payload(1))
        nursery.cancel_scope.cancel()


async def test_without_the_background_task_the_next_call_after_the_cooldown_is_the_probe(own_server):
    tier = breaker_tier(own_server, own_server.create_bucket())
    await tier.put(key(1), payload(1))
    own_server.stop()
    assert await tier.contains([key(1)]) == [False]  # the failures open it
    assert tier.adapter.breaker.state is BreakerState.OPEN
    own_server.start()
    await trio.sleep_until(tier.adapter.breaker.retry_at)
    assert await tier.contains([key(1), key(2)]) == [True, False]  # the first HEAD probes
    assert tier.adapter.breaker.state is BreakerState.CLOSED


async def test_an_endpoint_down_at_start_defers_recovery_until_it_answers(own_server):
    bucket = own_server.create_bucket()
    await breaker_tier(own_server, bucket).put(key(1), payload(1))
    own_server.stop()
    tier = breaker_tier(own_server, bucket)
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)  # starts although the scan failed
        assert not tier.health().healthy
        assert not tier.recovered.is_set()
        own_server.start()
        with trio.fail_after(10):
            await tier.recovered.wait()
        assert tier.usage().total_bytes_used == SIZE
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------ configuration


async def test_an_l2_spec_builds_an_s3_tier_with_its_settings(s3_bucket):
    text = f"s3://{s3_bucket.bucket}/kv/tier2?endpoint={s3_bucket.endpoint_url}&capacity=1MiB"
    tier = L2Tier.from_spec(parse_spec(f"{text}&threads=3&breaker_failures=5&max_retries=1"))
    assert isinstance(tier.adapter, S3Adapter)
    assert (tier.adapter.prefix, tier.capacity, tier.adapter.max_retries) == ("kv/tier2/", 1 << 20, 1)
    assert tier.adapter.breaker.failure_threshold == 5 and tier.adapter.limiter.total_tokens == 3
    assert await tier.put(key(1), payload(1))
    assert names(s3_bucket, "kv/tier2/") == [tier.adapter.object_name(key(1))]
