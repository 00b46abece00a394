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
from trio_kv.adapters.breaker import BreakerState
from trio_kv.adapters.s3 import MIN_PART_SIZE, BreakerOpen, S3Adapter
from trio_kv.adapters.spec import build_adapter, parse_spec
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


@pytest.fixture
def make_adapter(s3_bucket: S3Bucket) -> Iterator[Callable[..., S3Adapter]]:
    def make(**settings: Any) -> S3Adapter:
        settings.setdefault("prefix", "kv/")
        adapter = S3Adapter(s3_bucket.bucket, endpoint_url=s3_bucket.endpoint_url, **settings)
        adapter.retry_base_s = 0.005
        return adapter

    yield make


@pytest.fixture
def adapter(make_adapter: Callable[..., S3Adapter]) -> S3Adapter:
    return make_adapter()


def count_requests(adapter: S3Adapter) -> Counter[str]:
    """Every HTTP request the adapter's client sends, by operation name."""
    sent: Counter[str] = Counter()

    def on_send(event_name: str, **kwargs: Any) -> None:
        sent[event_name.rsplit(".", 1)[1]] += 1

    adapter.client.meta.events.register("before-send.s3", on_send)
    return sent


def names(bucket: S3Bucket, prefix: str = "kv/") -> list[str]:
    return bucket.server.object_names(bucket.bucket, prefix)


def assert_settled(adapter: S3Adapter) -> None:
    assert adapter.pinned() == 0
    assert adapter.limiter.borrowed_tokens == 0


# ------------------------------------------------------------ the basics


async def test_put_then_get_into_returns_the_same_bytes(adapter):
    assert await adapter.put(key(1), payload(1))
    buffer = empty()
    assert await adapter.get_into(key(1), buffer)
    assert bytes(buffer) == bytes(payload(1))


async def test_a_second_put_of_a_present_key_sends_nothing_and_counts_nothing(adapter):
    sent = count_requests(adapter)
    assert await adapter.put(key(1), payload(1))
    assert not await adapter.put(key(1), payload(1))
    assert sent["PutObject"] == 1
    assert adapter.usage().total_bytes_used == SIZE


async def test_contains_says_which_keys_are_in_the_bucket(adapter):
    await adapter.put(key(1), payload(1))
    await adapter.put(key(3), payload(3))
    sent = count_requests(adapter)
    assert await adapter.contains([key(1), key(2), key(3)]) == [True, False, True]
    assert sent["HeadObject"] == 3


async def test_delete_removes_objects_from_the_bucket(adapter, s3_bucket):
    for n in range(4):
        await adapter.put(key(n), payload(n))
    sent = count_requests(adapter)
    assert await adapter.delete([key(0)]) == 1
    assert await adapter.delete([key(1), key(2), key(9)]) == 3  # one batch; an absent key is no error
    assert sent == {"DeleteObject": 1, "DeleteObjects": 1}
    assert names(s3_bucket) == [adapter.object_name(key(3))]
    assert adapter.usage().total_bytes_used == SIZE


async def test_the_ledger_counts_bytes_per_salt_exactly(adapter):
    await adapter.put(key(1, "a"), payload(1, 1000))
    await adapter.put(key(2, "a"), payload(2, 3000))
    await adapter.put(key(3, "b"), payload(3, 500))
    await adapter.put(key(4), payload(4, 7))
    assert adapter.usage().bytes_by_salt == {"a": 4000, "b": 500, "": 7}
    await adapter.delete([key(1, "a"), key(3, "b")])
    assert adapter.usage().bytes_by_salt == {"a": 3000, "": 7}
    assert adapter.usage().total_bytes_used == 3007


async def test_objects_carry_their_key_record_and_are_named_by_the_codec(adapter, s3_bucket):
    await adapter.put(key(1, "tenant"), payload(1))
    (name,) = names(s3_bucket)
    assert name == "kv/v1/s_tenant/m_llama/1x0/01/01000000000000000000000000000000"
    metadata = s3_bucket.server.client().head_object(Bucket=s3_bucket.bucket, Key=name)["Metadata"]
    assert "trio-kv-key" in metadata


async def test_an_object_of_another_length_is_a_miss(adapter):
    await adapter.put(key(1), payload(1))
    assert not await adapter.get_into(key(1), empty(SIZE + 1))
    assert not await adapter.get_into(key(1), empty(SIZE - 1))
    assert adapter.usage().total_bytes_used == 0  # the ledger no longer counts what is not there


async def test_a_missing_object_is_a_miss(adapter):
    assert not await adapter.get_into(key(7), empty())
    assert_settled(adapter)


# ------------------------------------------------------------ recovery


async def test_a_new_adapter_on_the_same_prefix_recovers_identical_usage(make_adapter, s3_bucket):
    first = make_adapter()
    await first.put(key(1, "a"), payload(1, 1000))
    await first.put(key(2, "b"), payload(2, 2000))
    await first.put(key(3, "b", model=LONG_MODEL), payload(3, 3000))
    assert any("/md_" in name for name in names(s3_bucket))  # the long model name is a digest
    await make_adapter(prefix="other/").put(key(4), payload(4))  # another prefix: not ours
    s3_bucket.server.client().put_object(Bucket=s3_bucket.bucket, Key="kv/notes.txt", Body=b"foreign")

    second = make_adapter()
    assert await second.recover() == 3
    assert second.usage() == first.usage()
    assert second.ledger.size_of(key(3, "b", model=LONG_MODEL)) == 3000
    assert second.foreign_objects == 1
    buffer = empty(3000)
    assert await second.get_into(key(3, "b", model=LONG_MODEL), buffer)
    assert bytes(buffer) == bytes(payload(3, 3000))


async def test_recovery_lists_every_page(make_adapter):
    first = make_adapter()
    for n in range(5):
        await first.put(key(n), payload(n, 10))
    second = make_adapter()
    second.list_page_size = 2
    sent = count_requests(second)
    assert await second.recover() == 5
    assert sent["ListObjectsV2"] == 3
    assert second.usage().total_bytes_used == 50


# ------------------------------------------------------------ large objects


async def test_large_objects_go_up_in_parts_and_come_back_in_ranges(make_adapter, s3_bucket):
    adapter = make_adapter(multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE)
    size = 2 * MIN_PART_SIZE + 12345
    sent = count_requests(adapter)
    assert await adapter.put(key(1), payload(1, size))
    buffer = empty(size)
    assert await adapter.get_into(key(1), buffer)
    assert bytes(buffer) == bytes(payload(1, size))
    assert sent["UploadPart"] == 3 and sent["CompleteMultipartUpload"] == 1
    assert sent["GetObject"] == 3
    assert not await adapter.get_into(key(1), empty(size + 1))  # ranges check the whole length
    uploads = s3_bucket.server.client().list_multipart_uploads(Bucket=s3_bucket.bucket)
    assert not uploads.get("Uploads")


# ------------------------------------------------------------ eviction


async def test_capacity_eviction_deletes_objects_in_the_bucket_and_never_a_pinned_one(
    make_adapter, s3_bucket
):
    adapter = make_adapter(capacity=4 * SIZE, high_watermark=0.75, low_watermark=0.5)
    down_to_low_watermark = trio.Event()

    def on_remove(event: str, keys: object) -> None:
        if event == "remove" and adapter.usage().total_bytes_used <= 2 * SIZE:
            down_to_low_watermark.set()

    adapter.ledger.add_key_listener(on_remove)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        await adapter.put(key(0), payload(0))
        adapter.pin(key(0))  # a lookup is loading it
        for n in (1, 2, 3):
            await adapter.put(key(n), payload(n))  # the fourth passes the high watermark
        with trio.fail_after(10):
            await down_to_low_watermark.wait()
        nursery.cancel_scope.cancel()
    assert names(s3_bucket) == sorted(adapter.object_name(k) for k in (key(0), key(3)))
    assert adapter.evictions == 2
    adapter.unpin(key(0))


# ------------------------------------------------------------ cancellation


class BlockedSend:
    """Holds the adapter's next request of one operation in its worker thread until released."""

    def __init__(self, adapter: S3Adapter, operation: str) -> None:
        self.entered = trio.Event()
        self._release = threading.Event()
        self._token = trio.lowlevel.current_trio_token()
        adapter.client.meta.events.register(f"before-send.s3.{operation}", self._hold)

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


async def test_a_cancelled_put_leaves_the_ledger_and_the_bucket_as_they_were(adapter, s3_bucket):
    await adapter.put(key(1), payload(1))
    before = adapter.usage()
    await cancel_when_sent(
        BlockedSend(adapter, "PutObject"), lambda: adapter.put(key(2), payload(2, 1 << 20))
    )
    assert adapter.usage() == before
    assert names(s3_bucket) == [adapter.object_name(key(1))]
    assert_settled(adapter)
    assert await adapter.put(key(2), payload(2))  # the client still works


async def test_a_cancelled_multipart_put_aborts_its_upload(make_adapter, s3_bucket):
    adapter = make_adapter(multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE)
    big = payload(1, MIN_PART_SIZE + 1)
    await cancel_when_sent(BlockedSend(adapter, "UploadPart"), lambda: adapter.put(key(1), big))
    assert adapter.usage().total_bytes_used == 0
    assert names(s3_bucket) == []
    assert not s3_bucket.server.client().list_multipart_uploads(Bucket=s3_bucket.bucket).get("Uploads")
    assert_settled(adapter)


async def test_a_cancelled_get_leaves_the_ledger_and_the_pins_as_they_were(adapter):
    await adapter.put(key(1), payload(1))
    before = adapter.usage()
    buffer = empty()
    await cancel_when_sent(BlockedSend(adapter, "GetObject"), lambda: adapter.get_into(key(1), buffer))
    assert bytes(buffer) == bytes(SIZE)  # the read stopped before its first byte
    assert adapter.usage() == before
    assert_settled(adapter)
    assert await adapter.get_into(key(1), buffer)


# ------------------------------------------------------------ retries


class _ErrorBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._body


def answer_with(adapter: S3Adapter, operation: str, status: int, code: str, times: int) -> list[int]:
    """Make the next ``times`` requests of ``operation`` get an S3 error answer instead of going out."""
    answered = [0]
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>test</Message></Error>".encode()

    def fake(request: Any, **kwargs: Any) -> AWSResponse | None:
        if answered[0] >= times:
            return None
        answered[0] += 1
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _ErrorBody(body))

    adapter.client.meta.events.register(f"before-send.s3.{operation}", fake)
    return answered


@pytest.mark.parametrize(
    ("status", "code"), [(503, "SlowDown"), (429, "TooManyRequests"), (500, "InternalError")]
)
async def test_throttling_and_server_errors_are_retried(adapter, status, code):
    answered = answer_with(adapter, "PutObject", status, code, times=2)
    assert await adapter.put(key(1), payload(1))
    assert answered == [2]
    assert adapter.retries == 2
    assert adapter.breaker.state is BreakerState.CLOSED


async def test_a_call_still_throttled_after_its_retries_fails(make_adapter):
    adapter = make_adapter(max_retries=2)
    answer_with(adapter, "PutObject", 503, "SlowDown", times=10)
    with pytest.raises(AdapterError, match="SlowDown"):
        await adapter.put(key(1), payload(1))
    assert adapter.retries == 2
    assert adapter.usage().total_bytes_used == 0


async def test_an_access_error_is_not_retried(adapter):
    answer_with(adapter, "PutObject", 403, "AccessDenied", times=10)
    with pytest.raises(AdapterError, match="AccessDenied"):
        await adapter.put(key(1), payload(1))
    assert adapter.retries == 0


# ------------------------------------------------------------ the circuit breaker


@pytest.fixture
def own_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3TestServer]:
    """A server of the test's own, to stop and restart."""
    use_fake_credentials(monkeypatch)
    with running_s3_server() as server:
        yield server


def breaker_adapter(server: S3TestServer, bucket: str) -> S3Adapter:
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
    return adapter


async def test_the_breaker_opens_when_the_endpoint_dies_and_closes_when_it_is_back(own_server):
    adapter = breaker_adapter(own_server, own_server.create_bucket())
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        await adapter.put(key(1), payload(1))

        own_server.stop()
        with pytest.raises(AdapterError):
            await adapter.put(key(2), payload(2))
        health = adapter.health()
        assert not health.healthy and health.state == "breaker-open"
        assert "connection failures" in health.reason
        assert adapter.breaker.blocking()

        sent = count_requests(adapter)
        assert await adapter.contains([key(1)]) == [False]
        assert not await adapter.get_into(key(1), empty())
        with pytest.raises(BreakerOpen):
            await adapter.put(key(3), payload(3))
        assert sum(sent.values()) == 0  # nothing was sent while the breaker was open
        assert key(1) in adapter.ledger  # a miss for now, not gone
        assert adapter.usage().total_bytes_used == SIZE

        own_server.start()
        with trio.fail_after(10):
            await adapter.wait_breaker_closed()  # the background probe, after the cool-down
        assert sent == {"HeadBucket": 1}
        assert adapter.health().healthy
        assert await adapter.put(key(3), payload(3))
        buffer = empty()
        assert await adapter.get_into(key(1), buffer)
        assert bytes(buffer) == bytes(payload(1))
        nursery.cancel_scope.cancel()


async def test_without_the_background_task_the_next_call_after_the_cooldown_is_the_probe(own_server):
    adapter = breaker_adapter(own_server, own_server.create_bucket())
    await adapter.put(key(1), payload(1))
    own_server.stop()
    assert await adapter.contains([key(1)]) == [False]  # the failures open it
    assert adapter.breaker.state is BreakerState.OPEN
    own_server.start()
    await trio.sleep_until(adapter.breaker.retry_at)
    assert await adapter.contains([key(1), key(2)]) == [True, False]  # the first HEAD probes
    assert adapter.breaker.state is BreakerState.CLOSED


async def test_an_endpoint_down_at_start_defers_recovery_until_it_answers(own_server):
    bucket = own_server.create_bucket()
    await breaker_adapter(own_server, bucket).put(key(1), payload(1))
    own_server.stop()
    adapter = breaker_adapter(own_server, bucket)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)  # starts although the scan failed
        assert not adapter.health().healthy
        assert not adapter.recovered.is_set()
        own_server.start()
        with trio.fail_after(10):
            await adapter.recovered.wait()
        assert adapter.usage().total_bytes_used == SIZE
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------ configuration


async def test_an_l2_spec_builds_an_s3_adapter_with_its_settings(s3_bucket):
    text = f"s3://{s3_bucket.bucket}/kv/tier2?endpoint={s3_bucket.endpoint_url}&capacity=1MiB"
    adapter = build_adapter(parse_spec(f"{text}&threads=3&breaker_failures=5&max_retries=1"))
    assert isinstance(adapter, S3Adapter)
    assert (adapter.prefix, adapter.capacity, adapter.max_retries) == ("kv/tier2/", 1 << 20, 1)
    assert adapter.breaker.failure_threshold == 5 and adapter.limiter.total_tokens == 3
    assert await adapter.put(key(1), payload(1))
    assert names(s3_bucket, "kv/tier2/") == [adapter.object_name(key(1))]
