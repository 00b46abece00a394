"""Scheduler-side connector logic: lookups, load and store plans, request endings. No vLLM import.

Called from vLLM's scheduler thread, which must never wait on the server: every
server call runs in ``BackgroundCalls`` and its result is picked up on a later
call (``get_num_new_matched_tokens`` answers None while a lookup is in flight,
and vLLM asks again on its next step).

Per request: one lookup (again after a preemption) leases the hit chunks; the
allocation releases the leases of chunks vLLM already holds and plans one
retrieve of the rest; each step plans a store of the whole chunks its forward
pass completes; the end of the request ends its server session. A lookup
claims the chunks it misses (the request will store them), so the lookups of
requests sharing the prefix that arrive meanwhile wait on the server for those
stores and load the prefix instead of computing it too. Every server
call carries the request's ``cache_salt`` (as a trio-kv salt, ``tenant_salt``),
and every key a model field that also names the request's LoRA adapter and
multimodal inputs (``key_model``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec

from ..client import BlockingClient
from ..keys import RequestKey
from .background import BackgroundCalls
from .config import ConnectorConfig
from .connection import check_chunk_size, connect
from .metadata import RetrievePlan, SchedulerStep, StepPlan, StorePlan
from .request_state import EngineRequest, PendingLookup, RequestState

__all__ = ["EngineRequest", "SchedulerLogic"]

log = logging.getLogger("trio_kv.vllm")


class SchedulerStats(msgspec.Struct):
    """Counters since start-up."""

    lookups: int = 0  # lookups answered (a failed or late one counts as a miss)
    lookup_hit_tokens: int = 0  # tokens the server reported holding, summed over lookups
    lookup_failures: int = 0  # lookups that raised or had no answer in time


class SchedulerLogic:
    """The scheduler-side half of the connector (see the module docstring).

    ``load``/``save`` follow vLLM's ``kv_role`` (a ``kv_producer`` only saves, a
    ``kv_consumer`` only loads). A lookup without an answer after
    ``lookup_timeout_s`` counts as a miss, so a server that stops answering
    delays each request once instead of holding it back forever.
    """

    def __init__(
        self,
        calls: BackgroundCalls,
        *,
        model: str,
        world_size: int,
        block_size: int,
        async_load: bool = True,
        load: bool = True,
        save: bool = True,
        lookup_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_chunk_size(calls.chunk_size, block_size)
        self._calls = calls
        self.model = model
        self.world_size = world_size
        self.block_size = block_size
        self.chunk_size = calls.chunk_size
        self.async_load = async_load
        self.load = load
        self.save = save
        self.lookup_timeout_s = lookup_timeout_s
        self._clock = clock
        self._trackers: dict[str, RequestState] = {}
        self.stats = SchedulerStats()

    @classmethod
    def connect(
        cls,
        config: ConnectorConfig,
        *,
        model: str,
        world_size: int,
        block_size: int,
        load: bool = True,
        save: bool = True,
    ) -> SchedulerLogic:
        """Connect to the server in ``config`` (blocking: start-up only) and check the chunk size."""
        client = connect(config, client_name="trio_kv.vllm.scheduler")
        calls = BackgroundCalls(client, threads=config.threads, name="trio-kv-scheduler")
        try:
            return cls(
                calls,
                model=model,
                world_size=world_size,
                block_size=block_size,
                async_load=config.async_load,
                load=load,
                save=save,
                lookup_timeout_s=config.timeout_s,
            )
        except BaseException:
            calls.close()
            raise

    # ------------------------------------------------------------ vLLM's calls

    def get_num_new_matched_tokens(
        self, request: EngineRequest, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens past ``num_computed_tokens`` that trio-kv can load, and whether the load is async.

        Never blocks: the first call submits the lookup and answers None, as do
        calls while it is in flight. The load ends on a chunk boundary, except
        that the last prompt token is always left to vLLM to compute (it needs
        its logits); it starts at ``num_computed_tokens`` (vLLM's own prefix-cache
        hit, which may end inside a chunk).
        """
        tracker = self._trackers.get(request.request_id)
        if tracker is None:
            tracker = self._trackers[request.request_id] = RequestState(request, self.model)
        elif tracker.allocated:
            tracker.readmit()  # asked again after an admission: the request was preempted
        if not self.load or tracker.model is None:
            return 0, False
        tracker.local_tokens = num_computed_tokens // self.block_size * self.block_size
        num_tokens = len(request.all_token_ids)
        if tracker.lookup is None:
            if self._full_chunk_tokens(num_tokens) <= tracker.local_tokens:
                return 0, False  # vLLM holds every chunk trio-kv could have
            self._start_lookup(tracker, num_tokens)
            return None, False
        hit = self._hit_tokens(tracker)
        if hit is None:
            return None, False
        new_tokens = min(hit, num_tokens - 1) - tracker.local_tokens
        if new_tokens <= 0:
            return 0, False
        return new_tokens, self.async_load

    def update_state_after_alloc(
        self, request: EngineRequest, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """Plan the load of ``num_external_tokens`` into the request's blocks (its whole block table).

        Leases on chunks vLLM already holds are released now; the retrieve skips
        those tokens so blocks shared through vLLM's prefix cache are not written.
        A second call for the same admission (after an async load) changes nothing.
        """
        tracker = self._trackers.get(request.request_id)
        if tracker is None:
            tracker = self._trackers[request.request_id] = RequestState(request, self.model)
        if tracker.allocated:
            return
        tracker.allocated = True
        tracker.block_ids = list(block_ids)
        hit = self._hit_tokens(tracker) or 0
        local = tracker.local_tokens
        if num_external_tokens <= 0 or hit <= local or tracker.model is None:
            if hit:
                self._release(tracker, 0, None)
            return
        load_end = min(hit, self._round_up_to_chunk(local + num_external_tokens))
        if local >= self.chunk_size:
            self._release(tracker, 0, local // self.chunk_size * self.chunk_size)
        if hit > load_end:
            self._release(tracker, load_end, None)
        tracker.pending_retrieve = RetrievePlan(
            request_id=request.request_id,
            model=tracker.model,
            cache_salt=tracker.salt,
            tokens=tracker.packed_tokens(load_end),
            block_ids=tracker.block_ids[: load_end // self.block_size],
            skip_tokens=local,
            is_async=self.async_load,
        )

    def build_connector_meta(self, step: SchedulerStep) -> StepPlan:
        """This step's retrieves (planned at allocation) and stores (chunks this step completes)."""
        retrieves = []
        for tracker in self._trackers.values():
            if tracker.pending_retrieve is not None:
                retrieves.append(tracker.pending_retrieve)
                tracker.pending_retrieve = None
        stores = []
        for scheduled in step.requests:
            scheduled_tracker = self._trackers.get(scheduled.request_id)
            if scheduled_tracker is None:
                continue
            if scheduled.replaces_block_ids:
                scheduled_tracker.block_ids = list(scheduled.block_ids or ())
            elif scheduled.block_ids:
                scheduled_tracker.block_ids.extend(scheduled.block_ids)
            if scheduled.num_computed_tokens < scheduled_tracker.stored_until:
                # vLLM went back (a load failed): chunks past this point are recomputed, store them again.
                scheduled_tracker.stored_until = self._full_chunk_tokens(scheduled.num_computed_tokens)
            computed = scheduled.num_computed_tokens + scheduled.num_scheduled_tokens
            store = self._plan_store(scheduled_tracker, computed) if self.save else None
            if store is not None:
                stores.append(store)
        return StepPlan(retrieves=retrieves, stores=stores, preempted_req_ids=list(step.preempted_req_ids))

    def request_finished(self, request: EngineRequest) -> bool:
        """End the request's server session; True if a store was planned (vLLM must keep the
        blocks until the workers report the request in ``get_finished``)."""
        tracker = self._trackers.pop(request.request_id, None)
        if tracker is None:
            return False
        if tracker.session_open and not self._defer_end_session(tracker.lookup):
            request_id, salt = request.request_id, tracker.salt
            self._calls.fire(
                f"EndSession({request_id!r})", lambda client: client.end_session(request_id, salt)
            )
        return tracker.had_store

    # ------------------------------------------------------------ housekeeping

    def lookups_in_flight(self) -> int:
        """Lookups submitted whose result no step has picked up yet."""
        return sum(
            1
            for tracker in self._trackers.values()
            if tracker.lookup is not None
            and tracker.lookup.future is not None
            and not tracker.lookup.future.done()
        )

    def calls_in_flight(self) -> int:
        """Server calls (lookups, releases, session ends) submitted and not yet returned."""
        return self._calls.in_flight()

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait for every server call submitted so far (tests, shutdown)."""
        return self._calls.drain(timeout_s)

    def close(self) -> None:
        """Finish the calls in flight (EndSession included) and disconnect."""
        self._calls.close()

    # ------------------------------------------------------------ helpers

    def _start_lookup(self, tracker: RequestState, num_tokens: int) -> None:
        request = tracker.request
        end = self._full_chunk_tokens(num_tokens)
        assert tracker.model is not None
        key = RequestKey(
            tracker.model,
            self.world_size,
            None,
            tracker.packed_tokens(end),
            request_id=request.request_id,
            cache_salt=tracker.salt,
        )
        lookup = PendingLookup(self._clock())
        claim = self.save  # this request stores what it computes: other lookups may wait for it

        def run(client: BlockingClient) -> int:
            try:
                return client.lookup(key, claim=claim).hit_tokens
            finally:
                with lookup.lock:
                    lookup.returned = True
                    end_session = lookup.end_session_after
                if end_session:
                    self._end_session_now(client, key.request_id, key.cache_salt)

        tracker.lookup = lookup
        tracker.session_open = True
        lookup.future = self._calls.submit(run)

    @staticmethod
    def _defer_end_session(lookup: PendingLookup | None) -> bool:
        """Hand EndSession to a lookup still in flight; False if it has returned (send it now)."""
        if lookup is None:
            return False
        with lookup.lock:
            if lookup.returned:
                return False
            lookup.end_session_after = True
            return True

    @staticmethod
    def _end_session_now(client: BlockingClient, request_id: str, salt: str) -> None:
        try:
            client.end_session(request_id, salt)
        except Exception as exc:
            log.warning("trio-kv: EndSession(%r) failed: %s", request_id, exc)

    def _hit_tokens(self, tracker: RequestState) -> int | None:
        """The lookup's hit, once it has returned (None before); a failed lookup is no hit."""
        if tracker.hit_tokens is not None:
            return tracker.hit_tokens
        lookup = tracker.lookup
        if lookup is None or lookup.future is None:
            return 0
        if not lookup.future.done():
            if self._clock() - lookup.submitted_at < self.lookup_timeout_s:
                return None
            log.warning(
                "trio-kv: no lookup answer for %r within %s s, computing it instead",
                tracker.request.request_id,
                self.lookup_timeout_s,
            )
            tracker.hit_tokens = 0  # a late answer's leases end with the session (request_finished)
            self.stats.lookups += 1
            self.stats.lookup_failures += 1
            return 0
        self.stats.lookups += 1
        try:
            tracker.hit_tokens = lookup.future.result()
        except Exception as exc:
            log.warning(
                "trio-kv: lookup for %r failed, computing it instead: %s", tracker.request.request_id, exc
            )
            self.stats.lookup_failures += 1
            tracker.hit_tokens = 0
        self.stats.lookup_hit_tokens += tracker.hit_tokens
        return tracker.hit_tokens

    def _release(self, tracker: RequestState, start: int, end: int | None) -> None:
        request_id, salt = tracker.request.request_id, tracker.salt
        self._calls.fire(
            f"ReleaseLookup({request_id!r}, [{start}, {end}))",
            lambda client: client.release(request_id, salt, start, end),
        )

    def _plan_store(self, tracker: RequestState, computed_tokens: int) -> StorePlan | None:
        """A store of the whole chunks that are computed once this step's forward pass has run."""
        if tracker.model is None:
            return None
        tokens = tracker.request.all_token_ids
        # Tokens vLLM has not appended yet (async scheduling, draft tokens) have no known id.
        known = min(computed_tokens, len(tokens), len(tracker.block_ids) * self.block_size)
        end = self._full_chunk_tokens(known)
        if end <= tracker.stored_until:
            return None
        store = StorePlan(
            request_id=tracker.request.request_id,
            model=tracker.model,
            cache_salt=tracker.salt,
            tokens=tracker.packed_tokens(end),
            block_ids=tracker.block_ids[: end // self.block_size],
            start=tracker.stored_until,
        )
        tracker.stored_until = end
        tracker.had_store = True
        return store

    def _full_chunk_tokens(self, num_tokens: int) -> int:
        return num_tokens // self.chunk_size * self.chunk_size

    def _round_up_to_chunk(self, num_tokens: int) -> int:
        return -(-num_tokens // self.chunk_size) * self.chunk_size
