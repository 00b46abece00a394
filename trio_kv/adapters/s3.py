"""The S3 L2 adapter: one object per chunk in a bucket, through boto3 in worker threads.

* **Names.** ``prefix + codec.object_name(key)``. Every object also carries its key
  record (``codec.encode_key_record``, base64) in the metadata ``x-amz-meta-trio-kv-key``,
  so objects whose names are digests (very long model names or salts) are recovered
  by a HEAD. Credentials come from the standard AWS chain (environment, profile,
  container or instance metadata); endpoint, region, bucket and prefix are settings.
* **Calls.** contains: a HEAD per key, several at once. put: PutObject, or above
  ``multipart_threshold`` a multipart upload whose parts go up in parallel (aborted
  if anything fails). get: GetObject read straight into the caller's buffer, or above
  the threshold ranged GETs in parallel; an object of another length is a miss.
  delete: DeleteObject, or DeleteObjects for up to 1000 at a time. scan: ListObjectsV2
  under the prefix, page by page. The default threshold (64 MiB) sends a 32 MiB chunk
  in one request: tiering already moves many chunks at once, and a split measured
  slower against the test server; larger objects go in 16 MiB parts.
* **Retries.** botocore's own retries are off; each call is retried here, up to
  ``max_retries`` times with jittered exponential backoff slept on the Trio clock, on
  throttling (503 SlowDown, 429), other 5xx answers and connection failures.
* **Circuit breaker** (``breaker.CircuitBreaker``): ``breaker_failures`` consecutive
  connection failures open it. While it is open, contains and get_into answer "miss"
  without calling the endpoint (and the ledger keeps its keys: the objects are most
  likely still there), puts and deletes raise ``BreakerOpen``, and ``health()`` reports
  "breaker-open". After ``breaker_cooldown_s`` one call goes through as a probe (the
  task ``run()`` starts sends a HeadBucket itself); its success closes the breaker. If
  the endpoint is down when ``run()`` starts, the recovery scan waits for that.
* **Threads and cancellation.** Each call runs in a worker thread under ``self.limiter``.
  A cancelled call sets an abort flag that the transfer checks every block (16 KiB
  sent, 1 MiB received), waits for the thread to return (at worst until the client's
  connect/read timeout) and only then raises Cancelled, so no thread outlives its
  call and the ledger never disagrees with the bucket. A call that finished anyway
  returns its result (so a finished put is counted) and the cancellation arrives at
  the caller's next checkpoint.

Why boto3 in threads rather than awscrt's S3 client bridged into Trio: the adapter
needs HEAD with metadata, ListObjectsV2, DeleteObjects and multipart calls, which
boto3 has (signed, parsed, credential chain included) and CRT's S3 client would need
built and parsed by hand; the breaker must see every attempt's outcome, while CRT
retries inside itself; and a thread that checks an abort flag per block and is
bounded by socket timeouts is simple to make cancellation-safe and to test. The bytes
are not copied on the way out (the request body reads slices of the caller's memory)
nor on the way in (``readinto`` from the HTTP response). CRT's native parallel parts
would matter at multi-GB/s against real S3; that swap stays inside this module.
"""

from __future__ import annotations

import base64
import enum
import functools
import http.client
import logging
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import trio

from ..keys import ObjectKey
from . import codec
from .base import AdapterError, AdapterHealth, L2Adapter
from .breaker import BreakerState, CircuitBreaker

log = logging.getLogger(__name__)

T = TypeVar("T")
MIB = 1024 * 1024
METADATA_KEY = "trio-kv-key"  # sent as x-amz-meta-trio-kv-key
MULTIPART_THRESHOLD = 64 * MIB  # larger objects move in parallel parts
PART_SIZE = 16 * MIB
MIN_PART_SIZE = 5 * MIB  # S3's floor for every part but the last
READ_STEP = 1 * MIB  # bytes per readinto, so an abort is seen this often
DELETE_BATCH = 1000  # DeleteObjects' limit
CALLS_AT_ONCE = 16  # HEADs or parts of one operation in flight (threads are bounded too)
ABORT_UPLOAD_TIMEOUT_S = 10.0
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRYABLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded"}
    | {"RequestTimeout", "InternalError", "ServiceUnavailable"}
)
_CONNECTION_ERRORS = (
    botocore.exceptions.ConnectionError,  # refused, unreachable, connect/read timeouts, closed
    botocore.exceptions.HTTPClientError,
    OSError,  # reading a response body: reset, timeout
    http.client.HTTPException,  # a body that ended early
)


class BreakerOpen(AdapterError):
    """The call was not sent: the circuit breaker is open."""


class _Failure(enum.Enum):
    CONNECTION = "connection"  # counts toward the breaker; retried
    RETRYABLE = "retryable"  # throttling or 5xx; retried
    FATAL = "fatal"  # anything else (403, a bad request, no credentials)


class S3RequestFailed(AdapterError):
    """One S3 call failed (after its retries, if it was worth retrying)."""

    def __init__(self, message: str, failure: _Failure) -> None:
        super().__init__(message)
        self.failure = failure


class _Aborted(Exception):
    """Raised inside a worker thread when its call was cancelled."""


def _status(exc: botocore.exceptions.ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _classify(exc: BaseException) -> _Failure:
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        retryable = _status(exc) in _RETRYABLE_STATUS or code in _RETRYABLE_CODES
        return _Failure.RETRYABLE if retryable else _Failure.FATAL
    if isinstance(exc, _CONNECTION_ERRORS):
        return _Failure.CONNECTION
    return _Failure.FATAL


def _bytes_view(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class _PayloadReader:
    """A read-only file over the caller's memory, as botocore's request body: ``read``
    hands out slices of it (no copy); once ``abort`` is set the next read raises."""

    def __init__(self, payload: memoryview, abort: threading.Event) -> None:
        self._payload = payload
        self._abort = abort
        self._position = 0

    def read(self, size: int | None = -1) -> memoryview:
        if self._abort.is_set():
            raise _Aborted
        end = len(self._payload) if size is None or size < 0 else self._position + size
        chunk = self._payload[self._position : end]
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, len(self._payload))[whence]
        self._position = min(max(base + offset, 0), len(self._payload))
        return self._position

    def tell(self) -> int:
        return self._position


def _read_body_into(body: Any, target: memoryview, abort: threading.Event) -> None:
    """Fill ``target`` from a GetObject body. Reads straight from the HTTP response into
    ``target`` where botocore's stream is the usual urllib3/http.client pair, else copies
    through ``read``. Raises IncompleteRead if the body ends early."""
    raw = getattr(body, "_raw_stream", None)
    response = getattr(raw, "_fp", None)
    direct = isinstance(response, http.client.HTTPResponse)
    done = 0
    try:
        while done < len(target):
            if abort.is_set():
                raise _Aborted
            step = target[done : done + READ_STEP]
            if direct:
                got = response.readinto(step)  # type: ignore[union-attr]
            else:
                chunk = body.read(len(step))
                got = len(chunk)
                step[:got] = chunk
            if not got:
                raise http.client.IncompleteRead(b"", len(target) - done)
            done += got
    except BaseException:
        body.close()  # a half-read response cannot go back to the pool
        raise
    if direct and response.isclosed():  # type: ignore[union-attr]
        raw.release_conn()  # type: ignore[union-attr]  # read to its end: reusable
    else:
        body.close()


def make_client(
    endpoint_url: str | None,
    region: str | None,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    pool: int,
) -> Any:
    """A boto3 S3 client as this adapter (and its benchmark) use it: no botocore retries,
    bounded timeouts, no extra pass over payloads for checksums or payload signing."""
    session = boto3.session.Session()
    config = botocore.config.Config(
        region_name=region or session.region_name or "us-east-1",
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=pool,
        tcp_keepalive=True,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"payload_signing_enabled": False, "addressing_style": "path" if endpoint_url else "auto"},
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config)


class S3Adapter(L2Adapter):
    """Objects in ``bucket`` under ``prefix``. ``retries`` counts calls sent again,
    ``breaker_skips`` calls not sent because the breaker was open, ``foreign_objects``
    names under the prefix the codec does not parse."""

    kind = "s3"
    retry_base_s = 0.05  # first backoff; doubles per retry, with jitter
    retry_cap_s = 2.0
    list_page_size = 1000  # names per ListObjectsV2 page (S3's maximum)

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        capacity: int | None = None,
        name: str | None = None,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 5.0,
        max_retries: int = 3,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        **base_kwargs: Any,
    ) -> None:
        default_name = f"s3:{bucket}/{prefix.rstrip('/')}" if prefix else f"s3:{bucket}"
        super().__init__(name or default_name, capacity=capacity, **base_kwargs)
        if part_size < MIN_PART_SIZE or multipart_threshold < part_size:
            raise ValueError(f"{self.name}: need {MIN_PART_SIZE} <= part_size <= multipart_threshold")
        if max_retries < 0:
            raise ValueError(f"{self.name}: max_retries must be >= 0")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.max_retries = max_retries
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.breaker = CircuitBreaker(
            breaker_failures, breaker_cooldown_s, trio.current_time, on_change=self._breaker_moved
        )
        self._breaker_changed = trio.Event()
        self._recovery_pending = False
        self.recovered = trio.Event()  # set once the recovery scan has run (at start or deferred)
        self.retries = 0
        self.breaker_skips = 0
        self.foreign_objects = 0
        self.client = make_client(
            endpoint_url,
            region,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            pool=int(self.limiter.total_tokens) + 2,
        )

    def object_name(self, key: ObjectKey) -> str:
        return self.prefix + codec.object_name(key)

    def health(self) -> AdapterHealth:
        if self.breaker.state is BreakerState.CLOSED:
            return AdapterHealth(healthy=True)
        probing = " (probing)" if self.breaker.state is BreakerState.HALF_OPEN else ""
        return AdapterHealth(healthy=False, state="breaker-open", reason=self.breaker.reason + probing)

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

    async def _put(self, key: ObjectKey, payload: memoryview) -> None:
        payload = _bytes_view(payload)
        name = self.object_name(key)
        metadata = {METADATA_KEY: base64.b64encode(codec.encode_key_record(key)).decode("ascii")}
        if len(payload) > self.multipart_threshold:
            await self._put_multipart(name, payload, metadata)
            return

        def put(abort: threading.Event) -> None:
            body = _PayloadReader(payload, abort)
            self.client.put_object(
                Bucket=self.bucket, Key=name, Body=body, ContentLength=len(payload), Metadata=metadata
            )

        await self._request(f"PUT {name}", put)

    async def _put_multipart(self, name: str, payload: memoryview, metadata: dict[str, str]) -> None:
        """Upload in parallel parts; on failure or cancellation the upload is aborted (shielded,
        bounded), so no parts are left behind."""
        created = await self._request(
            f"create multipart upload {name}",
            lambda abort: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=name, Metadata=metadata
            ),
        )
        upload_id = created["UploadId"]
        starts = range(0, len(payload), self.part_size)
        etags = [""] * len(starts)

        def upload_part(number: int, part: memoryview, abort: threading.Event) -> str:
            answer = self.client.upload_part(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                PartNumber=number,
                Body=_PayloadReader(part, abort),
                ContentLength=len(part),
            )
            return str(answer["ETag"])

        async def send(index: int) -> None:
            part = payload[starts[index] : starts[index] + self.part_size]
            call = functools.partial(upload_part, index + 1, part)
            etags[index] = await self._request(f"upload part {index + 1} of {name}", call)

        try:
            await self._run_all([functools.partial(send, i) for i in range(len(starts))])
            parts = [{"PartNumber": i + 1, "ETag": etag} for i, etag in enumerate(etags)]
            await self._request(
                f"complete multipart upload {name}",
                lambda abort: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
            )
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(ABORT_UPLOAD_TIMEOUT_S):
                try:
                    await self._request(
                        f"abort multipart upload {name}",
                        lambda abort: self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=name, UploadId=upload_id
                        ),
                    )
                except AdapterError as exc:
                    log.warning("%s: %s (its parts stay until a lifecycle rule removes them)", self.name, exc)
            raise

    async def get_into(self, key: ObjectKey, buffer: memoryview) -> bool:
        """As the base class, but while the breaker is open: a miss that leaves the ledger alone."""
        if self.breaker.blocking():
            self.breaker_skips += 1
            return False
        return await super().get_into(key, buffer)

    async def _get_into(self, key: ObjectKey, buffer: memoryview) -> bool:
        if self.breaker.blocking():
            self.breaker_skips += 1
            return False
        buffer = _bytes_view(buffer)
        name = self.object_name(key)
        if len(buffer) <= self.multipart_threshold:
            return await self._request(f"GET {name}", functools.partial(self._get_range, name, buffer, None))
        ranges = [slice(start, start + self.part_size) for start in range(0, len(buffer), self.part_size)]
        hits = [False] * len(ranges)

        async def read(index: int) -> None:
            call = functools.partial(self._get_range, name, buffer, ranges[index])
            hits[index] = await self._request(f"GET {name} part {index + 1}", call)

        await self._run_all([functools.partial(read, i) for i in range(len(ranges))])
        return all(hits)

    def _get_range(self, name: str, buffer: memoryview, part: slice | None, abort: threading.Event) -> bool:
        """Read the object (or bytes ``part`` of it) into ``buffer`` (in a thread). False if
        the object is absent or is not exactly ``len(buffer)`` bytes long."""
        target = buffer if part is None else buffer[part]
        extra = {} if part is None else {"Range": f"bytes={part.start}-{part.start + len(target) - 1}"}
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=name, **extra)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) in (404, 416):  # absent, or shorter than the range
                return False
            raise
        body = answer["Body"]
        total = answer["ContentLength"]
        if part is not None:
            total = int(str(answer.get("ContentRange", "/-1")).rpartition("/")[2])
        if total != len(buffer) or answer["ContentLength"] != len(target):
            body.close()
            return False
        _read_body_into(body, target, abort)
        return True

    async def _contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        if self.breaker.blocking():
            self.breaker_skips += 1
            return [False] * len(keys)
        found = [False] * len(keys)

        async def head(index: int) -> None:
            name = self.object_name(keys[index])
            found[index] = (
                await self._request(f"HEAD {name}", functools.partial(self._head, name)) is not None
            )

        try:
            await self._run_all([functools.partial(head, i) for i in range(len(keys))])
        except AdapterError:
            if self.breaker.state is BreakerState.CLOSED:
                raise
            return [False] * len(keys)  # the breaker opened meanwhile: a miss, as while it is open
        return found

    def _head(self, name: str, abort: threading.Event) -> dict[str, str] | None:
        """The object's user metadata, or None if it is absent (in a thread)."""
        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) == 404:
                return None
            raise
        return dict(answer.get("Metadata", {}))

    async def _delete(self, keys: Sequence[ObjectKey]) -> None:
        names = [self.object_name(key) for key in keys]
        if len(names) == 1:
            await self._request(
                f"DELETE {names[0]}",
                lambda abort: self.client.delete_object(Bucket=self.bucket, Key=names[0]),
            )
            return
        for start in range(0, len(names), DELETE_BATCH):
            batch = names[start : start + DELETE_BATCH]
            call = functools.partial(self._delete_batch, batch)
            errors = await self._request(f"DeleteObjects ({len(batch)} objects)", call)
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

    async def _scan(self) -> AsyncIterator[tuple[ObjectKey, int]]:
        token: str | None = None
        while True:
            page, token = await self._request(
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
            metadata = await self._request(f"HEAD {name}", functools.partial(self._head, name))
            key = self._key_from_metadata(name, metadata or {})
            if key is None:
                self.foreign_objects += 1
            else:
                found[index] = (key, size)

        await self._run_all([functools.partial(head, i) for i in range(len(named))])
        return [item for item in found if item is not None]

    def _key_from_metadata(self, name: str, metadata: dict[str, str]) -> ObjectKey | None:
        try:
            key = codec.decode_key_record(base64.b64decode(metadata.get(METADATA_KEY, ""), validate=True))
        except ValueError:  # binascii.Error is a ValueError
            return None
        return key if self.object_name(key) == name else None

    # ------------------------------------------------------------ recovery and the probe

    async def recover(self) -> int:
        """As the base class; but if the endpoint is unreachable (the breaker is open) the
        scan is left to the background task, which runs it once the breaker closes."""
        try:
            found = await super().recover()
        except AdapterError as exc:
            if self.breaker.state is BreakerState.CLOSED:
                raise
            self._recovery_pending = True
            log.warning("%s: recovery scan deferred until the endpoint answers: %s", self.name, exc)
            return 0
        self.recovered.set()
        return found

    async def _start_background(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._watch_breaker)

    async def _watch_breaker(self) -> None:
        """Probe an open breaker after each cool-down; run a deferred recovery once it closes."""
        while True:
            changed = self._breaker_changed
            state = self.breaker.state
            if state is BreakerState.OPEN:
                await trio.sleep_until(self.breaker.retry_at)
                if self.breaker.state is BreakerState.OPEN and self.breaker.allow():
                    await self._probe()
                continue
            if state is BreakerState.CLOSED and self._recovery_pending:
                await self._deferred_recovery()
                continue
            await changed.wait()

    async def _probe(self) -> None:
        """One HeadBucket, sent as the breaker's probe (the caller holds the probe)."""
        try:
            await self._attempt(
                f"probe (HEAD bucket {self.bucket})",
                lambda abort: self.client.head_bucket(Bucket=self.bucket),
            )
        except AdapterError as exc:
            log.info("%s: probe failed: %s", self.name, exc)

    async def _deferred_recovery(self) -> None:
        try:
            found = await super().recover()
        except AdapterError as exc:
            if self.breaker.state is BreakerState.CLOSED:
                self._recovery_pending = False  # not the endpoint's absence: trying again will not help
                log.error("%s: deferred recovery scan failed: %s", self.name, exc)
            return
        self._recovery_pending = False
        self.recovered.set()
        log.info("%s: deferred recovery scan found %d objects", self.name, found)

    # ------------------------------------------------------------ calls

    async def _request(self, what: str, call: Callable[[threading.Event], T]) -> T:
        """Send one call, retrying throttling, 5xx and connection failures with backoff while
        the breaker stays closed. Raises BreakerOpen if the breaker refuses it, else
        S3RequestFailed once it gives up. Cancellation: see ``_blocking``."""
        attempt = 0
        while True:
            if not self.breaker.allow():
                self.breaker_skips += 1
                raise BreakerOpen(
                    f"{self.name}: {what} not sent: circuit breaker open ({self.breaker.reason})"
                )
            try:
                return await self._attempt(what, call)
            except S3RequestFailed as exc:
                if exc.failure is _Failure.FATAL or attempt >= self.max_retries:
                    raise
                if self.breaker.state is not BreakerState.CLOSED:
                    raise
            delay = min(self.retry_cap_s, self.retry_base_s * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            self.retries += 1
            await trio.sleep(delay)

    async def _attempt(self, what: str, call: Callable[[threading.Event], T]) -> T:
        """Send one call once and tell the breaker how it went (an HTTP error answer counts as
        the endpoint being there). A probe cancelled before its verdict is handed back."""
        probing = self.breaker.state is BreakerState.HALF_OPEN
        try:
            result = await self._blocking(call)
        except Exception as exc:
            failure = _classify(exc)
            if failure is _Failure.CONNECTION:
                self.breaker.record_failure(f"{what}: {exc}")
            else:
                self.breaker.record_success()
            raise S3RequestFailed(f"{self.name}: {what}: {exc}", failure) from exc
        except BaseException:  # cancelled: no verdict
            if probing and self.breaker.state is BreakerState.HALF_OPEN:
                self.breaker.release_probe()
            raise
        self.breaker.record_success()
        return result

    async def _blocking(self, call: Callable[[threading.Event], T]) -> T:
        """Run ``call(abort)`` in a worker thread under ``self.limiter``. On cancellation set
        ``abort`` and keep waiting for the thread; then raise Cancelled, unless the call
        completed anyway, whose result is returned (the caller's next checkpoint raises)."""
        abort = threading.Event()
        async with self.limiter:
            task = trio.lowlevel.current_task()
            token = trio.lowlevel.current_trio_token()

            def deliver(outcome: Any) -> None:
                token.run_sync_soon(trio.lowlevel.reschedule, task, outcome)

            def on_cancel(raise_cancel: Callable[[], NoReturn]) -> trio.lowlevel.Abort:
                abort.set()
                return trio.lowlevel.Abort.FAILED  # we are rescheduled when the thread returns

            trio.lowlevel.start_thread_soon(functools.partial(call, abort), deliver)
            try:
                result: T = await trio.lowlevel.wait_task_rescheduled(on_cancel)
            except Exception:
                if abort.is_set():
                    await trio.lowlevel.checkpoint()  # delivers the pending Cancelled
                raise
        return result

    async def _run_all(self, jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
        """Run ``jobs``, CALLS_AT_ONCE at a time; the first AdapterError cancels the rest and is
        raised as it is (not in a group)."""
        if jobs and self.breaker.state is not BreakerState.CLOSED:
            # The first call is the breaker's probe: alone, or its refused siblings would cancel it.
            await jobs[0]()
            jobs = jobs[1:]
        if len(jobs) <= 1:
            for job in jobs:
                await job()
            return
        errors: list[AdapterError] = []
        queue = iter(jobs)

        async def worker(cancel_scope: trio.CancelScope) -> None:
            for job in queue:
                try:
                    await job()
                except AdapterError as exc:
                    errors.append(exc)
                    cancel_scope.cancel()
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(min(CALLS_AT_ONCE, len(jobs))):
                nursery.start_soon(worker, nursery.cancel_scope)
        if errors:
            raise errors[0]
