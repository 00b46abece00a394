"""Worker-side connector logic: registration, retrieves, stores, completion reports. No vLLM import.

Called from a vLLM worker's thread. Retrieves and stores run in
``BackgroundCalls``; each records its own outcome before it returns, so a
caller that waited for a retrieve sees its failed blocks.

Contracts with vLLM's scheduler:
- ``get_finished`` reports a request's saves once, only after vLLM has named the
  request as finished (in this call or an earlier one) and every store planned
  for it has returned; it reports async loads once, as they complete.
- ``get_block_ids_with_load_errors`` reports exactly the blocks a retrieve was
  asked to fill and did not (a failed retrieve: all of them), no later than the
  step in which the load is reported finished.
- A store that reads a block a synchronous load of the same step failed to fill
  is dropped: the forward pass read that block, so what it computed is wrong.
- On the CUDA path the worker records an interprocess event on the current
  stream before each step's stores and retrieves; the server waits on it before
  touching the blocks, so it sees the forward pass's writes.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Protocol

import msgspec
import torch

from ..client import BlockingClient
from ..errors import ErrorCode, TrioKVError
from ..keys import RequestKey
from ..protocol import (
    Registered,
    RegisterKVCache,
    ReplyT,
    RequestFor,
    Retrieve,
    RetrieveResult,
    Store,
    StoreResult,
)
from .background import BackgroundCalls
from .config import ConnectorConfig
from .connection import check_chunk_size, connect
from .metadata import RetrievePlan, StepPlan, StorePlan
from .registration import (
    FileMapping,
    block_dim,
    cuda_kv_cache_export,
    distinct_tensors,
    kv_cache_registration,
)
from .staging import StagingMirror


class IpcEvents(Protocol):
    """The engine's interprocess events (``trio_kv.export.ipc.CudaKVCacheExport`` on the CUDA path)."""

    def record_event(self) -> bytes:
        """Record the next event of a ring on the current stream; its handle, for
        ``Store``/``Retrieve.ipc_event`` (each step's requests name their own event)."""
        ...

    def close(self) -> None: ...


log = logging.getLogger("trio_kv.vllm")


class WorkerStats(msgspec.Struct):
    """Counters since start-up (chunks as the server reported them)."""

    chunks_stored: int = 0
    chunks_loaded: int = 0
    store_failures: int = 0
    load_failures: int = 0  # retrieves that raised or filled fewer blocks than planned
    stores_dropped: int = 0  # stores skipped: they read blocks a load of the same step failed to fill


class _RequestStores:
    """Stores submitted for one request: how many are still running, and their futures."""

    __slots__ = ("cache_salt", "futures", "pending")

    def __init__(self, cache_salt: str) -> None:
        self.cache_salt = cache_salt
        self.pending = 0
        self.futures: list[Future[Any]] = []


class WorkerLogic:
    """The worker-side half of the connector (see the module docstring).

    Its keys' model field comes with each plan (the scheduler side derives it per request).
    """

    def __init__(
        self,
        calls: BackgroundCalls,
        *,
        world_size: int,
        rank: int,
        block_size: int,
        instance_id: str,
    ) -> None:
        check_chunk_size(calls.chunk_size, block_size)
        self._calls = calls
        self.world_size = world_size
        self.rank = rank
        self.block_size = block_size
        self.instance_id = instance_id
        self.registered = False
        self.stats = WorkerStats()
        self._lock = threading.Lock()
        self._stores: dict[str, _RequestStores] = {}
        self._finished_by_engine: set[str] = set()
        self._loads_done: set[str] = set()
        self._load_error_blocks: set[int] = set()
        self._sync_unfilled_blocks: set[int] = set()  # this step's: stores reading them are dropped
        self._events: IpcEvents | None = None
        self._registration: RegisterKVCache | None = None  # sent again to a restarted server
        self._register_lock = threading.Lock()
        self.staging: StagingMirror | None = None  # set when vLLM's CPU KV cache is private memory

    @classmethod
    def connect(
        cls,
        config: ConnectorConfig,
        *,
        world_size: int,
        rank: int,
        block_size: int,
        instance_id: str,
    ) -> WorkerLogic:
        """Connect to the server in ``config`` (blocking: start-up only) and check the chunk size."""
        client = connect(config, client_name=f"trio_kv.vllm.worker.{rank}")
        calls = BackgroundCalls(client, threads=config.threads, name=f"trio-kv-worker-{rank}")
        try:
            return cls(
                calls,
                world_size=world_size,
                rank=rank,
                block_size=block_size,
                instance_id=instance_id,
            )
        except BaseException:
            calls.close()
            raise

    # ------------------------------------------------------------ vLLM's calls

    def register_kv_caches(
        self,
        kv_caches: Mapping[str, torch.Tensor],
        *,
        num_blocks: int,
        shared: list[FileMapping] | None = None,
    ) -> None:
        """Register the engine's KV tensors with the server (blocking: start-up only).

        CUDA tensors are exported by CUDA IPC with an interprocess event. CPU
        tensors are registered where they lie when that is shared memory:
        ``shared`` (the regions ``SharedKVAllocation`` made) or, when None, any
        shared file mapping of this process. Otherwise blocks are staged through
        a shared mirror (``staging``), announced by one warning.
        """
        tensors = distinct_tensors(kv_caches.values())
        if tensors and tensors[0].is_cuda:
            export = cuda_kv_cache_export(kv_caches, block_size=self.block_size, num_blocks=num_blocks)
            self.register(export.register_request(self.instance_id), events=export)
            return
        try:
            request = kv_cache_registration(
                self.instance_id, kv_caches, block_size=self.block_size, num_blocks=num_blocks, maps=shared
            )
        except ValueError as exc:
            dims = [block_dim(tensor.shape, num_blocks) for tensor in tensors]
            log.warning(
                "trio-kv: vLLM's KV cache is not in shared memory (%s); staging blocks through a shared "
                "mirror instead (one more copy per store and retrieve, %d more bytes of memory)",
                exc,
                sum(tensor.numel() * tensor.element_size() for tensor in tensors),
            )
            self.staging = StagingMirror(tensors, dims)
            request = self.staging.registration(self.instance_id, self.block_size)
        self.register(request)

    def register(self, request: RegisterKVCache, *, events: IpcEvents | None = None) -> None:
        """Send ``request`` (blocking); ``events`` is recorded before every step's stores and retrieves."""
        try:
            self._calls.client.register(request)
        except BaseException:
            if events is not None:
                events.close()
            raise
        self._events = events
        self._registration = request
        self.registered = True

    def start_load_kv(self, plan: StepPlan) -> None:
        """Submit this step's retrieves; return once the synchronous ones (this batch's) are done."""
        self.handle_preemptions(plan.preempted_req_ids)
        if not plan.retrieves:
            return
        event = self._record_event()
        synchronous = []
        for retrieve in plan.retrieves:
            future = self._calls.submit(functools.partial(self._retrieve, retrieve, event))
            if not retrieve.is_async:
                synchronous.append(future)
        wait_futures(synchronous)

    def wait_for_save(self, plan: StepPlan) -> None:
        """Submit this step's stores (whole chunks the forward pass completed); returns at once.

        vLLM keeps the blocks until ``get_finished`` reports the request (or, for a
        preempted request, until ``handle_preemptions`` has waited for its stores).
        """
        with self._lock:
            unfilled, self._sync_unfilled_blocks = self._sync_unfilled_blocks, set()
        if not plan.stores:
            return
        event = self._record_event()
        for store in plan.stores:
            with self._lock:
                stores = self._stores.get(store.request_id)
                if stores is None:
                    stores = self._stores[store.request_id] = _RequestStores(store.cache_salt)
                if not unfilled.isdisjoint(store.block_ids):
                    self.stats.stores_dropped += 1
                    continue
                stores.pending += 1
                stores.futures = [f for f in stores.futures if not f.done()]
                stores.futures.append(self._calls.submit(functools.partial(self._store, store, event)))

    def handle_preemptions(self, request_ids: Iterable[str]) -> None:
        """Wait for the stores still reading blocks that vLLM freed when it preempted these requests."""
        with self._lock:
            futures = [f for rid in request_ids if rid in self._stores for f in self._stores[rid].futures]
        wait_futures(futures)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose saves are all done, requests whose async loads are done), each once."""
        with self._lock:
            self._finished_by_engine.update(finished_req_ids)
            sending: dict[str, str] = {}
            for request_id in list(self._finished_by_engine):
                stores = self._stores.get(request_id)
                if stores is None:
                    self._finished_by_engine.discard(request_id)  # nothing of ours to wait for
                elif stores.pending == 0:
                    sending[request_id] = stores.cache_salt
                    del self._stores[request_id]
                    self._finished_by_engine.discard(request_id)
            recving, self._loads_done = self._loads_done, set()
        for request_id, salt in sending.items():
            # The stores shared the request's hash session on the server: end it after the last one.
            self._calls.fire(
                f"EndSession({request_id!r})",
                functools.partial(_end_session, request_id=request_id, cache_salt=salt),
            )
        return set(sending) or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks that retrieves finished since the last call were meant to fill and did not."""
        with self._lock:
            blocks, self._load_error_blocks = self._load_error_blocks, set()
        return blocks

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait for every retrieve and store submitted so far (tests, shutdown)."""
        return self._calls.drain(timeout_s)

    def shutdown(self) -> None:
        """Finish the calls in flight, unregister the KV cache and disconnect."""
        self._calls.drain()
        if self.registered:
            try:
                self._calls.client.unregister(self.instance_id)
            except Exception as exc:
                log.warning("trio-kv: unregistering %r failed: %s", self.instance_id, exc)
            self.registered = False
        if self._events is not None:
            self._events.close()
            self._events = None
        if self.staging is not None:
            self.staging.close()
        self._calls.close()

    # ------------------------------------------------------------ background calls

    def _key(self, model: str, request_id: str, cache_salt: str, tokens: bytes, start: int = 0) -> RequestKey:
        return RequestKey(
            model,
            self.world_size,
            self.rank,
            tokens,
            start=start,
            request_id=request_id,
            cache_salt=cache_salt,
        )

    def _record_event(self) -> bytes:
        return b"" if self._events is None else self._events.record_event()

    def _retrieve(self, plan: RetrievePlan, event: bytes, client: BlockingClient) -> None:
        key = self._key(plan.model, plan.request_id, plan.cache_salt, plan.tokens)
        request = Retrieve(self.instance_id, key, plan.block_ids, plan.skip_tokens, event)
        try:
            result = self._call(client, request, RetrieveResult)
            valid_tokens, chunks = result.hit_tokens, result.chunks_written
            if self.staging is not None:
                filled = plan.block_ids[plan.skip_tokens // self.block_size : valid_tokens // self.block_size]
                self.staging.copy_in(filled)
        except Exception as exc:
            log.warning("trio-kv: retrieve for %r failed: %s", plan.request_id, exc)
            valid_tokens, chunks = 0, 0
        # Blocks before skip_tokens are vLLM's own; the retrieve was to fill the rest.
        unfilled = plan.block_ids[max(valid_tokens, plan.skip_tokens) // self.block_size :]
        with self._lock:
            self.stats.chunks_loaded += chunks
            if unfilled:
                self.stats.load_failures += 1
                self._load_error_blocks.update(unfilled)
                if not plan.is_async:
                    self._sync_unfilled_blocks.update(unfilled)
            if plan.is_async:
                self._loads_done.add(plan.request_id)

    def _store(self, plan: StorePlan, event: bytes, client: BlockingClient) -> None:
        key = self._key(plan.model, plan.request_id, plan.cache_salt, plan.tokens, plan.start)
        try:
            if self.staging is not None:
                self.staging.copy_out(plan.block_ids[plan.start // self.block_size :])
            result = self._call(client, Store(self.instance_id, key, plan.block_ids, event), StoreResult)
            with self._lock:
                self.stats.chunks_stored += result.stored
        except Exception as exc:
            log.warning("trio-kv: store for %r failed: %s", plan.request_id, exc)
            with self._lock:
                self.stats.store_failures += 1
        finally:
            with self._lock:
                self._stores[plan.request_id].pending -= 1

    def _call(self, client: BlockingClient, request: RequestFor[ReplyT], expected: type[ReplyT]) -> ReplyT:
        """``client.call``; a server that no longer knows our KV cache (it restarted) gets the
        registration again and the request once more."""
        try:
            return client.call(request, expected)
        except TrioKVError as exc:
            if exc.code != ErrorCode.UNKNOWN_INSTANCE or self._registration is None:
                raise
        with self._register_lock:
            log.info("trio-kv: the server does not know %r (restarted?); registering again", self.instance_id)
            client.call(self._registration, Registered)
        return client.call(request, expected)


def _end_session(client: BlockingClient, *, request_id: str, cache_salt: str) -> None:
    client.end_session(request_id, cache_salt)
