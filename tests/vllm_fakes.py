"""Stand-ins for the vLLM connector's unit tests: a recording client, a request, IPC events."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from trio_kv.keys import token_count
from trio_kv.protocol import (
    LookupResult,
    Registered,
    Released,
    Retrieve,
    RetrieveResult,
    SessionEnded,
    Store,
    StoreResult,
    Unregistered,
)
from trio_kv.vllm.background import BackgroundCalls
from trio_kv.vllm.scheduler import SchedulerLogic
from trio_kv.vllm.worker import WorkerLogic

CHUNK = 32
BLOCK = 16


class FakeClient:
    """Answers like a ``BlockingClient`` and records every call as a tuple, in order.

    Lookups hit ``lookup_hits`` tokens (at most the key's); retrieves fill
    ``retrieve_hits`` tokens (None: every chunk asked for). A ``*_gate`` event
    holds those calls until it is set; a ``*_error`` is raised instead of answering.
    """

    def __init__(self, chunk_size: int = CHUNK) -> None:
        self.chunk_size = chunk_size
        self.calls: list[tuple[Any, ...]] = []
        self.claims: list[bool] = []  # each lookup's ``claim``, in order
        self.lookup_hits = 0
        self.lookup_gate: threading.Event | None = None
        self.lookup_error: Exception | None = None
        self.retrieve_hits: int | None = None
        self.retrieve_error: Exception | None = None
        self.store_gate: threading.Event | None = None
        self.store_started = threading.Event()
        self.closed = False

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == kind]

    def lookup(self, key: Any, *, claim: bool = False) -> LookupResult:
        self.calls.append(("lookup", key))
        self.claims.append(claim)
        if self.lookup_gate is not None:
            self.lookup_gate.wait()
        if self.lookup_error is not None:
            raise self.lookup_error
        hit = min(self.lookup_hits, token_count(key) // self.chunk_size * self.chunk_size)
        self.calls.append(("lookup_returned", key.request_id))
        return LookupResult(hit_tokens=hit, l1_chunks=hit // self.chunk_size)

    def release(
        self, request_id: str, cache_salt: str = "", start: int = 0, end: int | None = None
    ) -> Released:
        self.calls.append(("release", request_id, cache_salt, start, end))
        return Released(0)

    def end_session(self, request_id: str, cache_salt: str = "") -> SessionEnded:
        self.calls.append(("end_session", request_id, cache_salt))
        return SessionEnded(0, True)

    def register(self, request: Any) -> Registered:
        self.calls.append(("register", request))
        return Registered(request.instance_id, 64, 1024)

    def unregister(self, instance_id: str) -> Unregistered:
        self.calls.append(("unregister", instance_id))
        return Unregistered(True)

    def call(self, request: Any, expected: type) -> Any:
        if isinstance(request, Retrieve):
            self.calls.append(("retrieve", request))
            if self.retrieve_error is not None:
                raise self.retrieve_error
            asked = token_count(request.key) // self.chunk_size * self.chunk_size
            hit = asked if self.retrieve_hits is None else min(self.retrieve_hits, asked)
            return RetrieveResult(hit_tokens=hit, chunks_written=hit // self.chunk_size)
        if isinstance(request, Store):
            self.calls.append(("store", request))
            self.store_started.set()
            if self.store_gate is not None:
                self.store_gate.wait()
            self.calls.append(("store_done", request.key.request_id))
            return StoreResult(stored=1, skipped_present=0, skipped_no_room=0)
        raise AssertionError(f"unexpected request {request!r}")

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list[int] = field(default_factory=list)
    cache_salt: str | None = None


def tokens(n: int, offset: int = 0) -> list[int]:
    return list(range(offset, offset + n))


class FakeEvents:
    """An engine's interprocess event: counts records, hands out one fixed handle."""

    handle = b"E" * 64

    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.closed = False

    def record_event(self) -> bytes:
        self.client.calls.append(("record_event",))
        return self.handle

    def close(self) -> None:
        self.closed = True


def scheduler_logic(client: FakeClient, **options: Any) -> SchedulerLogic:
    calls = BackgroundCalls(client, threads=2, name="test-scheduler")
    options.setdefault("block_size", BLOCK)
    return SchedulerLogic(calls, model="m", world_size=1, **options)


def worker_logic(client: FakeClient, **options: Any) -> WorkerLogic:
    calls = BackgroundCalls(client, threads=2, name="test-worker")
    return WorkerLogic(calls, world_size=1, rank=0, block_size=BLOCK, instance_id="w0", **options)
