"""Request and response bodies of S3 calls, in worker threads, without copies.

``PayloadReader`` hands botocore slices of the caller's memory as a request body;
``read_body_into`` reads a GetObject response straight into the caller's buffer.
Both check the call's abort flag every block (16 KiB sent, 1 MiB received), so a
cancelled call stops moving bytes soon.
"""

from __future__ import annotations

import http.client
import threading
from typing import Any

READ_STEP = 1024 * 1024  # bytes per readinto, so an abort is seen this often


class Aborted(Exception):
    """Raised inside a worker thread when its call was cancelled."""


class PayloadReader:
    """A read-only file over the caller's memory, as botocore's request body: ``read``
    hands out slices of it (no copy); once ``abort`` is set the next read raises."""

    def __init__(self, payload: memoryview, abort: threading.Event) -> None:
        self._payload = payload
        self._abort = abort
        self._position = 0

    def read(self, size: int | None = -1) -> memoryview:
        if self._abort.is_set():
            raise Aborted
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


def read_body_into(body: Any, target: memoryview, abort: threading.Event) -> None:
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
                raise Aborted
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
