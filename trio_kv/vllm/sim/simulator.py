"""A vLLM-shaped engine that drives the connector logic in vLLM's call order, without vLLM.

It is a test harness (the CPU path: shared-memory KV caches, a real trio-kv
server), not an inference engine. One ``step`` follows vLLM v1's scheduler and
model runner (checked against vLLM 0.33.0):

1. schedule: running requests first, preempting the newest when blocks run out;
   if nothing was preempted, waiting requests: a finished async load is promoted,
   a request with nothing computed asks the prefix cache and then
   ``get_num_new_matched_tokens`` (skipped while it answers None), blocks are
   allocated, ``update_state_after_alloc`` is called, and an async load parks the
   request in WAITING_FOR_REMOTE_KVS; then ``build_connector_meta`` (the plan is
   pickled and unpickled, as it crosses a process boundary in vLLM).
2. every worker: ``handle_preemptions``, ``start_load_kv`` (before the forward
   pass when the step has a synchronous load, else after it), the forward pass
   (``SimModel``), ``wait_for_save``, ``get_finished``,
   ``get_block_ids_with_load_errors``; completions count once every worker has
   reported them.
3. update: requests with invalid blocks go back to the first one (vLLM's
   "recompute" policy) and lose this step's output; the others advance, sample a
   token and may finish; a finished request's blocks are freed unless
   ``request_finished`` (or a pending async load) holds them until ``get_finished``.

A forward pass that reads KV it did not expect, with no load error reported
for that request, is recorded in ``SimEngine.corrupted``; a completion report
vLLM would reject (a save reported for a request whose blocks nothing holds, a
load reported for a request not waiting for one, a report repeated) is recorded
in ``SimEngine.violations``.
"""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Callable, Sequence

from ...export.shm import SharedKVCache
from ..metadata import ScheduledRequest, SchedulerStep, StepPlan
from ..scheduler import SchedulerLogic
from ..worker import WorkerLogic
from .blocks import BlockPool
from .model import SimModel, extend_prefix_hashes
from .request import Progress, SimRequest, Status

__all__ = ["Progress", "SimEngine", "SimRequest", "Status"]

VOCAB_SIZE = 32_000


class SimEngine:
    """One scheduler and one worker per rank (tensor parallelism), sharing a block table."""

    def __init__(
        self,
        scheduler: SchedulerLogic,
        workers: Sequence[WorkerLogic],
        kv_caches: Sequence[SharedKVCache],
        *,
        progress: Progress,
        prefix_caching: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        stores_within_step: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.workers = list(workers)
        self.model = SimModel(kv_caches)
        self.block_size = kv_caches[0].block_size
        self.pool = BlockPool(kv_caches[0].num_blocks, self.block_size, prefix_caching=prefix_caching)
        self.progress = progress
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        # A server that copies each step's blocks before the next forward pass overwrites them.
        self.stores_within_step = stores_within_step
        self.requests: dict[str, SimRequest] = {}
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.corrupted: list[str] = []
        self.violations: list[str] = []
        self.load_error_reports: list[set[int]] = []  # the invalid blocks of each step that had some
        self.on_plan: Callable[[StepPlan], None] | None = None  # called before the workers run a step
        self.steps = 0
        self._finished_since_last: set[str] = set()
        self._finished_recving: set[str] = set()
        self._held_blocks: dict[str, set[str]] = {}  # finished request -> what still holds its blocks
        self._sending_reports: Counter[str] = Counter()
        self._recving_reports: Counter[str] = Counter()
        for worker, cache in zip(self.workers, kv_caches):
            layers = {f"model.layers.{i}.self_attn": tensor for i, tensor in enumerate(cache.tensors)}
            worker.register_kv_caches(layers, num_blocks=cache.num_blocks)

    # ------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt: Sequence[int],
        *,
        max_new_tokens: int = 4,
        cache_salt: str | None = None,
    ) -> SimRequest:
        request = SimRequest(request_id, prompt, max_new_tokens, cache_salt)
        request.verified_until = [0] * len(self.workers)
        self.requests[request_id] = request
        self.waiting.append(request)
        return request

    def abort(self, request_id: str) -> None:
        request = self.requests[request_id]
        if not request.finished:
            self._finish(request, Status.FINISHED_ABORTED)

    def wait_for_scheduler_calls(self, at_most: int = 0, timeout_s: float = 10.0) -> None:
        """Wait until at most ``at_most`` scheduler-side server calls are in flight."""
        while True:
            seen = self.progress.count
            if self.scheduler.calls_in_flight() <= at_most:
                return
            if not self.progress.wait_beyond(seen, timeout_s):
                raise RuntimeError(f"scheduler calls still in flight after {timeout_s} s")

    def idle(self) -> bool:
        """No request waiting or running, and no finished request's blocks held."""
        return not self.waiting and not self.running and not self._held_blocks

    # ------------------------------------------------------------ driving

    def run(
        self, until: Callable[[], bool] | None = None, *, max_steps: int = 10_000, stall_s: float = 10.0
    ) -> None:
        """Step until ``until()`` (default: idle). A step that does nothing waits for a background
        call to finish (vLLM would step again and ask the connector again)."""
        done = until or self.idle
        for _ in range(max_steps):
            if done():
                return
            seen = self.progress.count
            if not self.step() and not self.progress.wait_beyond(seen, stall_s):
                raise RuntimeError(f"simulated engine stalled: waiting={self._names(self.waiting)}")
        raise RuntimeError(f"simulated engine did not finish in {max_steps} steps")

    def step(self) -> bool:
        """One engine step; False if it scheduled nothing and nothing completed."""
        self.steps += 1
        scheduled, preempted, admitted = self._schedule()
        plan = self.scheduler.build_connector_meta(SchedulerStep(scheduled, preempted))
        plan = pickle.loads(pickle.dumps(plan))
        if self.on_plan is not None:
            self.on_plan(plan)
        finished_ids, self._finished_since_last = self._finished_since_last, set()
        sending, recving, invalid = set(), set(), set()
        load_first = any(not retrieve.is_async for retrieve in plan.retrieves)
        for worker in self.workers:
            worker.handle_preemptions(plan.preempted_req_ids)
            if load_first:
                worker.start_load_kv(plan)
        read_ok = self._forward(scheduled)
        for worker in self.workers:
            if not load_first:
                worker.start_load_kv(plan)
            worker.wait_for_save(plan)
            if self.stores_within_step:
                worker.drain()
            worker_sending, worker_recving = worker.get_finished(finished_ids)
            sending |= self._all_ranks(self._sending_reports, worker_sending or set())
            recving |= self._all_ranks(self._recving_reports, worker_recving or set())
            invalid |= worker.get_block_ids_with_load_errors()
        self._update(scheduled, read_ok, sending, recving, invalid)
        return bool(scheduled or preempted or admitted or sending or recving or invalid)

    # ------------------------------------------------------------ schedule

    def _schedule(self) -> tuple[list[ScheduledRequest], list[str], bool]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            new_blocks = self._allocate(request, request.num_computed_tokens + num_new, [])
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
                new_blocks = self._allocate(request, request.num_computed_tokens + num_new, [])
            if new_blocks is None:
                break
            request.block_ids += new_blocks
            scheduled.append(
                ScheduledRequest(request.request_id, request.num_computed_tokens, num_new, new_blocks)
            )
            budget -= num_new
            index += 1
        admitted = False
        if not preempted:
            for request in list(self.waiting):
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    break
                outcome = self._admit(request, budget)
                if outcome is None:
                    continue
                if outcome is False:
                    break
                admitted = True
                if request.status is Status.RUNNING:
                    num_new = request.num_tokens - request.num_computed_tokens
                    num_new = min(num_new, budget)
                    scheduled.append(
                        ScheduledRequest(
                            request.request_id,
                            request.num_computed_tokens,
                            num_new,
                            list(request.block_ids),
                            True,
                        )
                    )
                    budget -= num_new
        return scheduled, preempted, admitted

    def _admit(self, request: SimRequest, budget: int) -> bool | None:
        """Try to admit a waiting request: None to skip it this step, False to stop admitting."""
        if request.status is Status.WAITING_FOR_REMOTE_KVS:
            if request.request_id not in self._finished_recving:
                return None
            self._finished_recving.discard(request.request_id)
            request.status = Status.WAITING
            if request.num_computed_tokens == 0:
                # The load failed from its first block: vLLM frees the blocks and starts over.
                self.pool.free(request.block_ids)
                request.block_ids = []
            self.pool.cache(
                request.all_token_ids, request.cache_salt, request.block_ids, request.num_computed_tokens
            )
        local_blocks: list[int] = []
        external, load_async = 0, False
        if request.num_computed_tokens == 0:
            local_blocks = self.pool.computed_blocks(request.all_token_ids, request.cache_salt)
            local = len(local_blocks) * self.block_size
            matched, load_async = self.scheduler.get_num_new_matched_tokens(request, local)
            if matched is None:
                return None
            external = matched
            request.local_hit_tokens = local
            num_computed = local + external
            request.verified_until = [0] * len(self.workers)
        else:
            num_computed = request.num_computed_tokens
        num_new = 0 if load_async else min(request.num_tokens - num_computed, budget)
        self.pool.touch(local_blocks)
        new_blocks = self._allocate(request, num_computed + num_new, local_blocks)
        if new_blocks is None:
            self.pool.free(local_blocks)
            return False
        request.block_ids = request.block_ids + local_blocks + new_blocks
        self.scheduler.update_state_after_alloc(request, list(request.block_ids), external)
        request.num_computed_tokens = num_computed
        request.external_tokens += external
        if load_async:
            request.status = Status.WAITING_FOR_REMOTE_KVS
        else:
            request.status = Status.RUNNING
            self.waiting.remove(request)
            self.running.append(request)
        return True

    def _allocate(self, request: SimRequest, num_tokens: int, extra_blocks: list[int]) -> list[int] | None:
        held = len(request.block_ids) + len(extra_blocks)
        return self.pool.allocate(-(-num_tokens // self.block_size) - held)

    def _preempt(self, request: SimRequest) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.status = Status.PREEMPTED
        request.preemptions += 1
        self.waiting.insert(0, request)

    # ------------------------------------------------------------ forward and update

    def _forward(self, scheduled: list[ScheduledRequest]) -> dict[str, bool]:
        """Per request: did every earlier position hold its KV? Then write the new positions."""
        read_ok = {}
        for item in scheduled:
            request = self.requests[item.request_id]
            extend_prefix_hashes(request.prefix_hashes, request.all_token_ids)
            start, end = item.num_computed_tokens, item.num_computed_tokens + item.num_scheduled_tokens
            ok = True
            for rank in range(len(self.workers)):
                checked = min(request.verified_until[rank], start)
                args = (request.block_ids, request.prefix_hashes)
                rank_ok = self.model.holds(rank, *args, checked, start)
                self.model.write(rank, *args, start, end, poison=not rank_ok)
                request.verified_until[rank] = end
                ok = ok and rank_ok
            read_ok[item.request_id] = ok
        return read_ok

    def _update(
        self,
        scheduled: list[ScheduledRequest],
        read_ok: dict[str, bool],
        sending: set[str],
        recving: set[str],
        invalid: set[int],
    ) -> None:
        failed = set()
        if invalid:
            self.load_error_reports.append(invalid)
            failed = self._apply_invalid_blocks(invalid)
        for item in scheduled:
            request = self.requests[item.request_id]
            if request.finished or request.request_id in failed:
                continue
            if not read_ok[item.request_id]:
                self.corrupted.append(request.request_id)
            request.num_computed_tokens += item.num_scheduled_tokens
            request.computed_tokens += item.num_scheduled_tokens
            self.pool.cache(
                request.all_token_ids, request.cache_salt, request.block_ids, request.num_computed_tokens
            )
            if request.num_computed_tokens == request.num_tokens:
                request.all_token_ids.append(request.prefix_hashes[-1] % VOCAB_SIZE)
                if len(request.output_token_ids) >= request.max_new_tokens:
                    self._finish(request, Status.FINISHED_STOPPED)
        for request_id in recving:
            request = self.requests[request_id]
            if request.status is Status.WAITING_FOR_REMOTE_KVS:
                if request_id in self._finished_recving:
                    self.violations.append(f"load of {request_id} reported twice")
                self._finished_recving.add(request_id)
            elif "load" in self._held_blocks.get(request_id, ()):
                self._release_blocks(request_id, "load")
            else:
                self.violations.append(f"load of {request_id} reported, but it waits for none")
        for request_id in sending:
            if "save" in self._held_blocks.get(request_id, ()):
                self._release_blocks(request_id, "save")
            else:
                self.violations.append(f"save of {request_id} reported, but nothing holds its blocks")

    def _apply_invalid_blocks(self, invalid: set[int]) -> set[str]:
        """Send requests holding unfilled blocks back to their first one; their ids."""
        failed = set()
        for request in self.running + self.waiting:
            bad = [i for i, block in enumerate(request.block_ids) if block in invalid]
            if not bad:
                continue
            restart = min(bad) * self.block_size
            if restart < request.num_computed_tokens:
                request.num_computed_tokens = restart
            request.verified_until = [min(v, restart) for v in request.verified_until]
            request.load_errors += 1
            failed.add(request.request_id)
        return failed

    def _finish(self, request: SimRequest, status: Status) -> None:
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        holders = set()
        if (
            request.status is Status.WAITING_FOR_REMOTE_KVS
            and request.request_id not in self._finished_recving
        ):
            holders.add("load")
        self._finished_recving.discard(request.request_id)
        if self.scheduler.request_finished(request):
            holders.add("save")
        request.status = status
        self._finished_since_last.add(request.request_id)
        if holders:
            self._held_blocks[request.request_id] = holders
        else:
            self.pool.free(request.block_ids)

    def _release_blocks(self, request_id: str, holder: str) -> None:
        holders = self._held_blocks[request_id]
        holders.discard(holder)
        if not holders:
            del self._held_blocks[request_id]
            self.pool.free(self.requests[request_id].block_ids)

    def _all_ranks(self, reports: Counter[str], request_ids: set[str]) -> set[str]:
        """Ids every worker has now reported (vLLM's KVOutputAggregator)."""
        complete = set()
        for request_id in request_ids:
            reports[request_id] += 1
            if reports[request_id] == len(self.workers):
                del reports[request_id]
                complete.add(request_id)
        return complete

    @staticmethod
    def _names(requests: Sequence[SimRequest]) -> list[str]:
        return [f"{r.request_id}:{r.status.value}" for r in requests]
