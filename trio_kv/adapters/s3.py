"""The S3 L2 adapter: one object per chunk in a bucket, through boto3 in worker threads.

* **Names.** ``prefix + codec.object_name(key)``. Every object also carries its key
  record (``codec.encode_key_record``, base64) in the metadata ``x-amz-meta-trio-kv-key``,
  so objects whose names are digests (very long model names or salts) are recovered
  by a HEAD. Credentials come from the standard AWS chain (environment, profile,
  container or instance metadata); endpoint, region, bucket and prefix are settings.
* **Calls** go through ``s3_transport.S3Transport`` (retries with backoff, worker
  threads, cancellation). contains: a HEAD per key, several at once. put: PutObject,
  or above ``multipart_threshold`` a multipart upload. get: GetObject, or ranged GETs
  above the threshold; an object of another length is a miss. delete: DeleteObject,
  or DeleteObjects for up to 1000 at a time. scan: ListObjectsV2 under the prefix,
  page by page. The default threshold (64 MiB) sends a 32 MiB chunk in one request:
  tiering already moves many chunks at once, and a split measured slower against the
  test server; larger objects go in 16 MiB parts.
* **Circuit breaker** (``breaker.CircuitBreaker``): ``breaker_failures`` consecutive
  connection failures open it. While it is open, contains answers "miss" and get_into
  raises ``Unavailable`` without calling the endpoint (the tier counts that as a miss and
  its ledger keeps the key: the object is most likely still there), puts and deletes
  raise ``BreakerOpen``, and ``health()`` reports "breaker-open". After
  ``breaker_cooldown_s`` one call goes through as a probe (``run()`` sends a HeadBucket
  itself); its success closes the breaker. A missing bucket (NoSuchBucket, or HeadBucket 404)
  is no success: it opens the breaker at once and ``health()`` says "bucket missing" until
  HeadBucket answers again; at start the scan raises ``StoreMissing`` (a wrong setting). A recovery scan that fails because the
  endpoint is down raises ``Unavailable``; the tier runs it again once the breaker closes
  (``wait_available``).

Why boto3 in threads rather than awscrt's S3 client bridged into Trio: the adapter
needs HEAD with metadata, ListObjectsV2, DeleteObjects and multipart calls, which
boto3 has (signed, parsed, credential chain included) and CRT's S3 client would need
built and parsed by hand; the breaker must see every attempt's outcome, while CRT
retries inside itself; and a thread that checks an abort flag per block and is
bounded by socket timeouts is simple to make cancellation-safe and to test. CRT's
native parallel parts would matter at multi-GB/s against real S3; that swap stays
inside ``s3_transport``.
"""

from __future__ import annotations

import base64
import functools
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import botocore.exceptions
import trio

from ..keys import ObjectKey
from . import codec
from .base import AdapterError, AdapterHealth, Hit, L2Adapter, StoreMissing, Unavailable
from .breaker import BreakerState, CircuitBreaker
from .s3_transport import (
    MIN_PART_SIZE,
    MULTIPART_THRESHOLD,
    PART_SIZE,
    BreakerOpen,
    HeadBucket404,
    S3Transport,
    make_client,
    status_of,
)

# BreakerOpen and MIN_PART_SIZE belong to the adapter's API: callers catch one and size parts by the other.
__all__ = ["MIN_PART_SIZE", "BreakerOpen", "S3Adapter"]

log = logging.getLogger(__name__)

METADATA_KEY = "trio-kv-key"  # sent as x-amz-meta-trio-kv-key
DELETE_BATCH = 1000  # DeleteObjects' limit


class S3Adapter(L2Adapter):
    """Objects in ``bucket`` under ``prefix``. ``retries`` counts calls sent again,
    ``breaker_skips`` calls not sent because the breaker was open, ``foreign_objects``
    names under the prefix the codec does not parse."""

    kind = "s3"
    list_page_size = 1000  # names per ListObjectsV2 page (S3's maximum)

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        name: str | None = None,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 5.0,
        max_retries: int = 3,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        max_threads: int = 8,
    ) -> None:
        default_name = f"s3:{bucket}/{prefix.rstrip('/')}" if prefix else f"s3:{bucket}"
        super().__init__(name or default_name, max_threads=max_threads)
        if part_size < MIN_PART_SIZE or multipart_threshold < part_size:
            raise ValueError(f"{self.name}: need {MIN_PART_SIZE} <= part_size <= multipart_threshold")
        if max_retries < 0:
            raise ValueError(f"{self.name}: max_retries must be >= 0")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.breaker = CircuitBreaker(
            breaker_failures, breaker_cooldown_s, trio.current_time, on_change=self._breaker_moved
        )
        self._breaker_changed = trio.Event()
        self.foreign_objects = 0
        client = make_client(
            endpoint_url,
            region,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            pool=int(self.limiter.total_tokens) + 2,
        )
        self.transport = S3Transport(
            self.name,
            client,
            bucket,
            self.breaker,
            self.limiter,
            max_retries=max_retries,
            multipart_threshold=multipart_threshold,
            part_size=part_size,
        )

    @property
    def client(self) -> Any:
        """The boto3 client every call goes through."""
        return self.transport.client

    @property
    def max_retries(self) -> int:
        return self.transport.max_retries

    @property
    def multipart_threshold(self) -> int:
        return self.transport.multipart_threshold

    @property
    def part_size(self) -> int:
        return self.transport.part_size

    @property
    def retries(self) -> int:
        return self.transport.retries

    @property
    def breaker_skips(self) -> int:
        return self.transport.breaker_skips

    @property
    def retry_base_s(self) -> float:
        """The first backoff before a retry; it doubles per retry, with jitter."""
        return self.transport.retry_base_s

    @retry_base_s.setter
    def retry_base_s(self, seconds: float) -> None:
        self.transport.retry_base_s = seconds

    def object_name(self, key: ObjectKey) -> str:
        return self.prefix + codec.object_name(key)

    def health(self) -> AdapterHealth:
        if self.transport.bucket_missing:
            return AdapterHealth(healthy=False, state="breaker-open", reason=self.transport.bucket_missing)
        if self.breaker.state is BreakerState.CLOSED:
            return AdapterHealth(healthy=True)
        probing = " (probing)" if self.breaker.state is BreakerState.HALF_OPEN else ""
        return AdapterHealth(healthy=False, state="breaker-open", reason=self.breaker.reason + probing)

    async def wait_breaker_change(self) -> BreakerState:
        """Return the breaker's next state, once it changes."""
        await self._breaker_changed.wait()
        return self.breaker.state

    async def wait_breaker_closed(self) -> None:
        """Return once the breaker is closed (at once if it is)."""
        while self.breaker.state is not BreakerState.CLOSED:
            await self._breaker_changed.wait()

    def _breaker_moved(self, state: BreakerState) -> None:
        log.log(
            logging.INFO if state is BreakerState.HALF_OPEN else logging.WARNING,
            "%s: circuit breaker %s%s",
            self.name,
            state.value,
            f": {self.breaker.reason}" if state is BreakerState.OPEN else "",
        )
        self._breaker_changed.set()
        self._breaker_changed = trio.Event()

    # ------------------------------------------------------------ primitives

    async def put(self, key: ObjectKey, payload: memoryview, layout: str = "") -> None:
        record = codec.encode_key_record(key, layout)
        metadata = {METADATA_KEY: base64.b64encode(record).decode("ascii")}
        await self.transport.put_object(self.object_name(key), _bytes_view(payload), metadata)

    async def get_into(self, key: ObjectKey, buffer: memoryview) -> Hit | None:
        """While the breaker is open: Unavailable, without calling the endpoint. The layout
        fingerprint comes from the key record in the object's metadata."""
        if self.transport.skip_while_open():
            raise Unavailable(f"{self.name}: circuit breaker open")
        metadata = await self.transport.get_object_into(self.object_name(key), _bytes_view(buffer))
        if metadata is None:
            return None
        try:
            record = base64.b64decode(metadata.get(METADATA_KEY, ""), validate=True)
        except ValueError:
            record = b""
        return Hit(layout=codec.record_layout(record))

    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        if self.transport.skip_while_open():
            return [False] * len(keys)
        found = [False] * len(keys)

        async def head(index: int) -> None:
            name = self.object_name(keys[index])
            found[index] = (
                await self.transport.request(f"HEAD {name}", functools.partial(self._head, name)) is not None
            )

        try:
            await self.transport.run_all([functools.partial(head, i) for i in range(len(keys))])
        except AdapterError:
            if self.breaker.state is BreakerState.CLOSED:
                raise
            return [False] * len(keys)  # the breaker opened meanwhile: a miss, as while it is open
        return found

    def _head_bucket(self, abort: threading.Event) -> None:
        """HeadBucket (in a thread); a 404 means the bucket is missing."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            if status_of(exc) == 404:
                raise HeadBucket404(f"HeadBucket: 404 {exc}") from exc
            raise

    def _head(self, name: str, abort: threading.Event) -> dict[str, str] | None:
        """The object's user metadata, or None if it is absent (in a thread)."""
        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as exc:
            if status_of(exc) == 404:
                return None
            raise
        return dict(answer.get("Metadata", {}))

    async def delete(self, keys: Sequence[ObjectKey]) -> None:
        names = [self.object_name(key) for key in keys]
        if len(names) == 1:
            await self.transport.request(
                f"DELETE {names[0]}",
                lambda abort: self.client.delete_object(Bucket=self.bucket, Key=names[0]),
            )
            return
        for start in range(0, len(names), DELETE_BATCH):
            batch = names[start : start + DELETE_BATCH]
            call = functools.partial(self._delete_batch, batch)
            errors = await self.transport.request(f"DeleteObjects ({len(batch)} objects)", call)
            if errors:
                first = errors[0]
                raise AdapterError(
                    f"{self.name}: {len(errors)} of {len(batch)} deletes failed; "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def _delete_batch(self, names: list[str], abort: threading.Event) -> list[dict[str, str]]:
        """One DeleteObjects call (in a thread); returns the errors other than NoSuchKey."""
        request = {"Objects": [{"Key": name} for name in names], "Quiet": True}
        answer = self.client.delete_objects(Bucket=self.bucket, Delete=request)
        return [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]

    async def scan(self) -> AsyncIterator[tuple[ObjectKey, int]]:
        """ListObjectsV2 page by page. A failure that leaves the breaker open (the endpoint
        is unreachable) is Unavailable: the tier scans again once ``wait_available`` returns."""
        try:
            async for found in self._scan_pages():
                yield found
        except AdapterError as exc:
            if self.breaker.state is BreakerState.CLOSED or isinstance(exc, (Unavailable, StoreMissing)):
                raise
            raise Unavailable(str(exc)) from exc

    async def _scan_pages(self) -> AsyncIterator[tuple[ObjectKey, int]]:
        token: str | None = None
        while True:
            page, token = await self.transport.request(
                f"LIST {self.bucket}/{self.prefix}", functools.partial(self._list_page, token)
            )
            digest_named: list[tuple[str, int]] = []
            for name, size in page:
                parsed = codec.parse_name(name[len(self.prefix) :]) if name.startswith(self.prefix) else None
                if parsed is None:
                    self.foreign_objects += 1
                elif parsed.key is not None:
                    yield parsed.key, size
                else:
                    digest_named.append((name, size))
            for found in await self._read_key_records(digest_named):
                yield found
            if token is None:
                return

    def _list_page(
        self, token: str | None, abort: threading.Event
    ) -> tuple[list[tuple[str, int]], str | None]:
        extra = {"ContinuationToken": token} if token else {}
        answer = self.client.list_objects_v2(
            Bucket=self.bucket, Prefix=self.prefix, MaxKeys=self.list_page_size, **extra
        )
        page = [(str(item["Key"]), int(item["Size"])) for item in answer.get("Contents", [])]
        return page, answer.get("NextContinuationToken") if answer.get("IsTruncated") else None

    async def _read_key_records(self, named: list[tuple[str, int]]) -> list[tuple[ObjectKey, int]]:
        """Keys of digest-named objects, from the key records in their metadata."""
        found: list[tuple[ObjectKey, int] | None] = [None] * len(named)

        async def head(index: int) -> None:
            name, size = named[index]
            metadata = await self.transport.request(f"HEAD {name}", functools.partial(self._head, name))
            key = self._key_from_metadata(name, metadata or {})
            if key is None:
                self.foreign_objects += 1
            else:
                found[index] = (key, size)

        await self.transport.run_all([functools.partial(head, i) for i in range(len(named))])
        return [item for item in found if item is not None]

    def _key_from_metadata(self, name: str, metadata: dict[str, str]) -> ObjectKey | None:
        try:
            key = codec.decode_key_record(base64.b64decode(metadata.get(METADATA_KEY, ""), validate=True))
        except ValueError:  # binascii.Error is a ValueError
            return None
        return key if self.object_name(key) == name else None

    # ------------------------------------------------------------ the probe

    async def wait_available(self) -> None:
        await self.wait_breaker_closed()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe an open breaker after each cool-down, until cancelled."""
        task_status.started()
        while True:
            changed = self._breaker_changed
            if self.breaker.state is BreakerState.OPEN:
                await trio.sleep_until(self.breaker.retry_at)
                if self.breaker.state is BreakerState.OPEN and self.breaker.allow():
                    await self._probe()
                continue
            await changed.wait()

    async def _probe(self) -> None:
        """One HeadBucket, sent as the breaker's probe (the caller holds the probe)."""
        try:
            await self.transport.attempt(f"probe (HEAD bucket {self.bucket})", self._head_bucket)
        except AdapterError as exc:
            log.info("%s: probe failed: %s", self.name, exc)


def _bytes_view(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
