"""S3 calls for the S3 adapter: a boto3 client driven from worker threads.

* **Client.** ``make_client``: no botocore retries, bounded connect/read timeouts, no
  extra pass over payloads for checksums or payload signing.
* **Retries.** ``S3Transport.request`` retries a call up to ``max_retries`` times with
  jittered exponential backoff slept on the Trio clock, on throttling (503 SlowDown,
  429), other 5xx answers and connection failures, while the circuit breaker stays
  closed. Every attempt's outcome is reported to the breaker: connection failures
  count toward opening it; any HTTP answer counts as the endpoint being there.
* **Objects.** ``put_object``: PutObject, or above ``multipart_threshold`` a multipart
  upload whose parts go up in parallel (aborted if anything fails). ``get_object_into``:
  GetObject read straight into the caller's buffer, or above the threshold ranged GETs
  in parallel; an object of another length is a miss. The bytes are not copied on the
  way out (the request body reads slices of the caller's memory) nor on the way in
  (``readinto`` from the HTTP response).
* **Threads and cancellation.** Each call runs in a worker thread under the adapter's
  limiter. A cancelled call sets an abort flag that the transfer checks every block
  (16 KiB sent, 1 MiB received), waits for the thread to return (at worst until the
  client's connect/read timeout) and only then raises Cancelled, so no thread outlives
  its call and the ledger never disagrees with the bucket. A call that finished anyway
  returns its result (so a finished put is counted) and the cancellation arrives at
  the caller's next checkpoint.
"""

from __future__ import annotations

import enum
import functools
import http.client
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import trio

from .base import AdapterError, StoreMissing, Unavailable
from .breaker import BreakerState, CircuitBreaker
from .s3_body import PayloadReader, read_body_into

log = logging.getLogger(__name__)

T = TypeVar("T")
MIB = 1024 * 1024
MULTIPART_THRESHOLD = 64 * MIB  # larger objects move in parallel parts
PART_SIZE = 16 * MIB
MIN_PART_SIZE = 5 * MIB  # S3's floor for every part but the last
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

Call = Callable[[threading.Event], T]  # runs in a worker thread; the event is its abort flag


class BreakerOpen(Unavailable):
    """The call was not sent: the circuit breaker is open (a kind of Unavailable, so a put
    refused this way counts as a breaker skip, not as a failed write)."""


class Failure(enum.Enum):
    CONNECTION = "connection"  # counts toward the breaker; retried
    RETRYABLE = "retryable"  # throttling or 5xx; retried
    FATAL = "fatal"  # anything else (403, a bad request, no credentials)
    BUCKET_MISSING = "bucket-missing"  # NoSuchBucket, or HeadBucket 404: opens the breaker at once


class S3RequestFailed(AdapterError):
    """One S3 call failed (after its retries, if it was worth retrying)."""

    def __init__(self, message: str, failure: Failure) -> None:
        super().__init__(message)
        self.failure = failure


class BucketMissing(S3RequestFailed, StoreMissing):
    """The bucket does not exist."""


class HeadBucket404(Exception):
    """HeadBucket answered 404 (a HEAD has no body, so no NoSuchBucket code comes with it)."""


def status_of(exc: botocore.exceptions.ClientError) -> int | None:
    """The HTTP status of an S3 error answer."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, HeadBucket404):
        return Failure.BUCKET_MISSING
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return Failure.BUCKET_MISSING
        retryable = status_of(exc) in _RETRYABLE_STATUS or code in _RETRYABLE_CODES
        return Failure.RETRYABLE if retryable else Failure.FATAL
    if isinstance(exc, _CONNECTION_ERRORS):
        return Failure.CONNECTION
    return Failure.FATAL


def make_client(
    endpoint_url: str | None,
    region: str | None,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    pool: int,
) -> Any:
    """A boto3 S3 client as the adapter (and its benchmark) use it: no botocore retries,
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


class S3Transport:
    """Calls to ``bucket`` through ``client`` for the adapter named ``label``, reported to
    ``breaker``. ``retries`` counts calls sent again, ``breaker_skips`` calls not sent
    because the breaker was open."""

    retry_base_s = 0.05  # first backoff; doubles per retry, with jitter
    retry_cap_s = 2.0

    def __init__(
        self,
        label: str,
        client: Any,
        bucket: str,
        breaker: CircuitBreaker,
        limiter: trio.CapacityLimiter,
        *,
        max_retries: int,
        multipart_threshold: int,
        part_size: int,
    ) -> None:
        self.label = label
        self.client = client
        self.bucket = bucket
        self.breaker = breaker
        self.limiter = limiter
        self.max_retries = max_retries
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.retries = 0
        self.breaker_skips = 0
        self.bucket_missing = ""  # why, while the bucket is known to be missing

    def skip_while_open(self) -> bool:
        """True (and counted in ``breaker_skips``) while the breaker refuses calls. While the
        bucket is missing only the HeadBucket probe is sent (a HEAD of an object would answer
        404 as if the object alone were absent, and close the breaker)."""
        if self.breaker.blocking() or self.bucket_missing:
            self.breaker_skips += 1
            return True
        return False

    # ------------------------------------------------------------ objects

    async def put_object(self, name: str, payload: memoryview, metadata: dict[str, str]) -> None:
        """Upload ``payload`` (bytes, 1-D) under ``name``; in parts above the threshold."""
        if len(payload) > self.multipart_threshold:
            await self._put_multipart(name, payload, metadata)
            return

        def put(abort: threading.Event) -> None:
            body = PayloadReader(payload, abort)
            self.client.put_object(
                Bucket=self.bucket, Key=name, Body=body, ContentLength=len(payload), Metadata=metadata
            )

        await self.request(f"PUT {name}", put)

    async def _put_multipart(self, name: str, payload: memoryview, metadata: dict[str, str]) -> None:
        """Upload in parallel parts; on failure or cancellation the upload is aborted (shielded,
        bounded), so no parts are left behind."""
        created = await self.request(
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
                Body=PayloadReader(part, abort),
                ContentLength=len(part),
            )
            return str(answer["ETag"])

        async def send(index: int) -> None:
            part = payload[starts[index] : starts[index] + self.part_size]
            call = functools.partial(upload_part, index + 1, part)
            etags[index] = await self.request(f"upload part {index + 1} of {name}", call)

        try:
            await self.run_all([functools.partial(send, i) for i in range(len(starts))])
            parts = [{"PartNumber": i + 1, "ETag": etag} for i, etag in enumerate(etags)]
            await self.request(
                f"complete multipart upload {name}",
                lambda abort: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
            )
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(ABORT_UPLOAD_TIMEOUT_S):
                try:
                    await self.request(
                        f"abort multipart upload {name}",
                        lambda abort: self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=name, UploadId=upload_id
                        ),
                    )
                except AdapterError as exc:
                    log.warning(
                        "%s: %s (its parts stay until a lifecycle rule removes them)", self.label, exc
                    )
            raise

    async def get_object_into(self, name: str, buffer: memoryview) -> dict[str, str] | None:
        """Read the object ``name`` into ``buffer`` (bytes, 1-D), in ranges above the
        threshold. Its user metadata, or None if it is absent or not exactly ``len(buffer)``
        bytes long."""
        if len(buffer) <= self.multipart_threshold:
            return await self.request(f"GET {name}", functools.partial(self._get_range, name, buffer, None))
        ranges = [slice(start, start + self.part_size) for start in range(0, len(buffer), self.part_size)]
        hits: list[dict[str, str] | None] = [None] * len(ranges)

        async def read(index: int) -> None:
            call = functools.partial(self._get_range, name, buffer, ranges[index])
            hits[index] = await self.request(f"GET {name} part {index + 1}", call)

        await self.run_all([functools.partial(read, i) for i in range(len(ranges))])
        if not all(hit is not None for hit in hits):
            return None
        return hits[0]

    def _get_range(
        self, name: str, buffer: memoryview, part: slice | None, abort: threading.Event
    ) -> dict[str, str] | None:
        """Read the object (or bytes ``part`` of it) into ``buffer`` (in a thread); its user
        metadata, or None if the object is absent or is not exactly ``len(buffer)`` bytes long."""
        target = buffer if part is None else buffer[part]
        extra = {} if part is None else {"Range": f"bytes={part.start}-{part.start + len(target) - 1}"}
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=name, **extra)
        except botocore.exceptions.ClientError as exc:
            if status_of(exc) in (404, 416):  # absent, or shorter than the range
                return None
            raise
        body = answer["Body"]
        total = answer["ContentLength"]
        if part is not None:
            total = int(str(answer.get("ContentRange", "/-1")).rpartition("/")[2])
        if total != len(buffer) or answer["ContentLength"] != len(target):
            body.close()
            return None
        read_body_into(body, target, abort)
        return dict(answer.get("Metadata", {}))

    # ------------------------------------------------------------ calls

    async def request(self, what: str, call: Call[T]) -> T:
        """Send one call, retrying throttling, 5xx and connection failures with backoff while
        the breaker stays closed. Raises BreakerOpen if the breaker refuses it, else
        S3RequestFailed once it gives up. Cancellation: see ``_blocking``."""
        attempt = 0
        while True:
            if self.bucket_missing or not self.breaker.allow():
                self.breaker_skips += 1
                raise BreakerOpen(
                    f"{self.label}: {what} not sent: circuit breaker open ({self.breaker.reason})"
                )
            try:
                return await self.attempt(what, call)
            except S3RequestFailed as exc:
                if exc.failure in (Failure.FATAL, Failure.BUCKET_MISSING) or attempt >= self.max_retries:
                    raise
                if self.breaker.state is not BreakerState.CLOSED:
                    raise
            delay = min(self.retry_cap_s, self.retry_base_s * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            self.retries += 1
            await trio.sleep(delay)

    async def attempt(self, what: str, call: Call[T]) -> T:
        """Send one call once and tell the breaker how it went (an HTTP error answer counts as
        the endpoint being there). A probe cancelled before its verdict is handed back."""
        probing = self.breaker.state is BreakerState.HALF_OPEN
        try:
            result = await self._blocking(call)
        except Exception as exc:
            failure = classify(exc)
            if failure is Failure.BUCKET_MISSING:
                if not self.bucket_missing:
                    log.error("%s: bucket %r does not exist (%s)", self.label, self.bucket, what)
                self.bucket_missing = f"bucket missing: {self.bucket!r} does not exist ({what})"
                self.breaker.trip(self.bucket_missing)
                message = f"{self.label}: bucket {self.bucket!r} does not exist ({what}: {exc})"
                raise BucketMissing(message, failure) from exc
            if failure is Failure.CONNECTION:
                self.breaker.record_failure(f"{what}: {exc}")
            else:
                self.breaker.record_success()
            raise S3RequestFailed(f"{self.label}: {what}: {exc}", failure) from exc
        except BaseException:  # cancelled: no verdict
            if probing and self.breaker.state is BreakerState.HALF_OPEN:
                self.breaker.release_probe()
            raise
        if self.bucket_missing:
            log.warning("%s: bucket %r is back", self.label, self.bucket)
            self.bucket_missing = ""
        self.breaker.record_success()
        return result

    async def _blocking(self, call: Call[T]) -> T:
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

    async def run_all(self, jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
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
