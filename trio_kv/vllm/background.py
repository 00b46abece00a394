"""Server calls off the engine's thread: a blocking client and a few threads that run its calls.

vLLM's scheduler and workers are plain threads that must not wait on the
network, so every call goes through ``BackgroundCalls.submit`` and is picked up
later (a lookup's result on the next scheduler step, a load's outcome by
``get_finished``). ``BlockingClient`` is safe to share: each call uses its own
nng context.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, TypeVar

from ..client import BlockingClient

T = TypeVar("T")
log = logging.getLogger("trio_kv.vllm")


class BackgroundCalls:
    """Runs client calls in ``threads`` worker threads and can wait for all of them.

    ``on_complete`` is called (in the worker thread) after every call finishes,
    whatever its outcome; a test harness uses it to wait for progress without polling.
    """

    def __init__(
        self,
        client: BlockingClient,
        *,
        threads: int,
        name: str,
        on_complete: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._on_complete = on_complete
        self._lock = threading.Lock()
        self._in_flight: set[Future[Any]] = set()
        self._closed = False

    @property
    def chunk_size(self) -> int:
        return self.client.chunk_size

    def submit(self, call: Callable[[BlockingClient], T]) -> Future[T]:
        """Run ``call(client)`` in a worker thread; its exception, if any, stays in the future."""
        with self._lock:
            if self._closed:
                raise RuntimeError("trio-kv connector is shut down")
            future = self._executor.submit(call, self.client)
            self._in_flight.add(future)
        future.add_done_callback(self._finished)
        return future

    def fire(self, description: str, call: Callable[[BlockingClient], object]) -> None:
        """Run ``call`` in the background; a failure is logged, not raised (nothing waits for it)."""

        def logged(client: BlockingClient) -> None:
            try:
                call(client)
            except Exception as exc:
                log.warning("trio-kv: %s failed: %s", description, exc)

        self.submit(logged)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every call submitted so far has finished; False if ``timeout_s`` passed first."""
        with self._lock:
            pending = list(self._in_flight)
        _, not_done = wait_futures(pending, timeout=timeout_s)
        return not not_done

    def close(self) -> None:
        """Let running and queued calls finish, then stop the threads and close the client."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)
        self.client.close()

    def _finished(self, future: Future[Any]) -> None:
        with self._lock:
            self._in_flight.discard(future)
        if self._on_complete is not None:
            self._on_complete()
