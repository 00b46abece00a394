"""The vLLM connector's logic driven in vLLM's call order (``trio_kv.vllm.sim.simulator``) against a
real in-process server, on the CPU path.

The simulated model's KV for a position is a function of the tokens up to it
and of the rank, and every forward pass checks the KV it reads: a wrong,
misplaced or missing load that no load error covered shows up in
``engine.corrupted``, a completion report vLLM would reject in ``engine.violations``.
Chunks are 32 tokens, blocks 16. The engine blocks, so each scenario runs in a
thread while the server runs on the test's Trio loop.
"""

from __future__ import annotations

import random

import pytest
import trio

from trio_kv.client import BlockingClient
from trio_kv.testing import FaultInjector, InjectedFault, assert_no_leaks, running_server
from trio_kv.vllm.config import ConnectorConfig
from trio_kv.vllm.metadata import StepPlan
from trio_kv.vllm.scheduler import SchedulerLogic
from trio_kv.vllm.sim.harness import simulated_engine
from trio_kv.vllm.sim.model import extend_prefix_hashes
from trio_kv.vllm.sim.simulator import SimEngine, SimRequest, Status
from trio_kv.vllm.worker import WorkerLogic

from .vllm_fakes import FakeRequest

DECODE_STEPS = 3  # max_new_tokens=4: the last sampled token's KV is never computed


def prompt(n_tokens: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n_tokens)]


def assert_sound(engine: SimEngine) -> None:
    assert engine.corrupted == []
    assert engine.violations == []


def holds_its_kv(engine: SimEngine, request: SimRequest, end: int) -> bool:
    """Whether the request's blocks hold, on every rank, exactly the KV of positions [0, end)."""
    hashes: list[int] = []
    extend_prefix_hashes(hashes, request.all_token_ids)
    return all(
        engine.model.holds(rank, request.block_ids, hashes, 0, end) for rank in range(len(engine.workers))
    )


class FailOnce:
    """A server fault hook that raises at ``point`` once, when armed."""

    def __init__(self) -> None:
        self.point: str | None = None
        self.fired = 0

    async def __call__(self, name: str) -> None:
        if name == self.point:
            self.point = None
            self.fired += 1
            raise InjectedFault(f"injected at {name}")


# ---------------------------------------------------------------- prefix sharing


async def test_a_request_sharing_a_prefix_loads_it_instead_of_recomputing(server):
    shared = prompt(96)

    def scenario():
        with simulated_engine(server.url, prefix_caching=False) as engine:
            first = engine.add_request("first", [*shared, *prompt(10, seed=1)])
            engine.run()
            second = engine.add_request("second", [*shared, *prompt(40, seed=2)])
            engine.run(until=lambda: second.status is Status.RUNNING)
            loaded_bytes_match = holds_its_kv(engine, second, 96)
            engine.run()
            assert_sound(engine)
            return first, second, loaded_bytes_match

    first, second, loaded_bytes_match = await trio.to_thread.run_sync(scenario)
    assert (first.external_tokens, first.computed_tokens) == (0, 106 + DECODE_STEPS)
    assert (second.external_tokens, second.computed_tokens) == (96, 40 + DECODE_STEPS)
    assert loaded_bytes_match
    assert_no_leaks(server)
    assert len(server.engine.sessions) == 0


async def test_synchronous_loads_share_a_prefix_too(server):
    shared = prompt(64)

    def scenario():
        with simulated_engine(server.url, prefix_caching=False, async_load=False) as engine:
            engine.add_request("first", [*shared, *prompt(5, seed=1)])
            engine.run()
            second = engine.add_request("second", [*shared, *prompt(5, seed=2)])
            engine.run()
            assert_sound(engine)
            return second

    second = await trio.to_thread.run_sync(scenario)
    assert (second.external_tokens, second.computed_tokens) == (64, 5 + DECODE_STEPS)
    assert_no_leaks(server)


async def test_a_prefix_vllm_still_holds_is_not_loaded_and_its_leases_are_released(server):
    shared = prompt(96)

    def scenario():
        with simulated_engine(server.url, prefix_caching=True) as engine:
            engine.add_request("first", [*shared, *prompt(10, seed=1)])
            engine.run()
            second = engine.add_request("second", [*shared, *prompt(40, seed=2)])
            engine.run(until=lambda: second.status is Status.RUNNING)
            engine.wait_for_scheduler_calls()
            leases_while_running = trio.from_thread.run_sync(len, server.engine.leases)
            engine.run()
            assert_sound(engine)
            return second, leases_while_running

    second, leases_while_running = await trio.to_thread.run_sync(scenario)
    assert (second.local_hit_tokens, second.external_tokens) == (96, 0)
    assert leases_while_running == 0
    assert_no_leaks(server)


async def test_blocks_shared_through_vllms_prefix_cache_are_skipped_by_the_load(server):
    shared = prompt(96)
    plans: list[StepPlan] = []

    def scenario():
        with simulated_engine(server.url, prefix_caching=True) as engine:
            first = engine.add_request("first", [*shared, *prompt(10, seed=1)])
            engine.run()
            engine.pool.evict(first.block_ids[3:])  # vLLM keeps blocks 0-2: a chunk and a half
            engine.on_plan = plans.append
            second = engine.add_request("second", [*shared, *prompt(40, seed=2)])
            engine.run()
            assert_sound(engine)
            return first, second

    first, second = await trio.to_thread.run_sync(scenario)
    assert (second.local_hit_tokens, second.external_tokens) == (48, 48)
    (retrieve,) = [r for plan in plans for r in plan.retrieves]
    assert retrieve.skip_tokens == 48
    assert retrieve.block_ids[:3] == first.block_ids[:3]
    assert_no_leaks(server)


async def test_tensor_parallel_ranks_each_load_their_own_shard(server):
    shared = prompt(64)

    def scenario():
        with simulated_engine(server.url, world_size=2, prefix_caching=False) as engine:
            engine.add_request("first", [*shared, *prompt(10, seed=1)])
            engine.run()
            second = engine.add_request("second", [*shared, *prompt(10, seed=2)])
            engine.run()
            assert_sound(engine)
            return second

    second = await trio.to_thread.run_sync(scenario)
    assert second.external_tokens == 64
    assert_no_leaks(server)


# ---------------------------------------------------------------- tenants


async def test_salted_requests_never_share_chunks(server):
    shared = prompt(96)

    def scenario():
        with simulated_engine(server.url, prefix_caching=False) as engine:
            engine.add_request("t1-first", [*shared, 1], cache_salt="t1")
            engine.run()
            other_tenant = engine.add_request("t2", [*shared, 2], cache_salt="t2")
            no_tenant = engine.add_request("none", [*shared, 3])
            engine.run()
            same_tenant = engine.add_request("t1-second", [*shared, 4], cache_salt="t1")
            engine.run()
            assert_sound(engine)
            return other_tenant, no_tenant, same_tenant

    other_tenant, no_tenant, same_tenant = await trio.to_thread.run_sync(scenario)
    assert other_tenant.external_tokens == no_tenant.external_tokens == 0
    assert same_tenant.external_tokens == 96
    assert set(server.engine.l1.ledger.usage().bytes_by_salt) == {"t1", "t2", ""}
    assert_no_leaks(server)


async def test_a_salt_the_server_would_refuse_still_keeps_its_tenant_apart(server):
    shared = prompt(64)

    def scenario():
        with simulated_engine(server.url, prefix_caching=False) as engine:
            engine.add_request("a", [*shared, 1], cache_salt="team/a")
            engine.run()
            other = engine.add_request("b", [*shared, 2], cache_salt="team/b")
            same = engine.add_request("c", [*shared, 3], cache_salt="team/a")
            engine.run()
            assert_sound(engine)
            return other, same

    other, same = await trio.to_thread.run_sync(scenario)
    assert (other.external_tokens, same.external_tokens) == (0, 64)
    assert_no_leaks(server)


# ---------------------------------------------------------------- preemption and aborts


async def test_a_preempted_request_loads_back_what_it_stored(server):
    def scenario():
        with simulated_engine(server.url, num_blocks=16, prefix_caching=False) as engine:
            first = engine.add_request("first", prompt(100, seed=1), max_new_tokens=60)
            second = engine.add_request("second", prompt(90, seed=2), max_new_tokens=60)
            engine.step()  # both look up; admitting them together makes their blocks collide
            engine.scheduler.drain()
            engine.run()
            assert_sound(engine)
            return first, second

    first, second = await trio.to_thread.run_sync(scenario)
    assert (first.preemptions, second.preemptions) == (0, 1)
    assert second.external_tokens >= 64
    assert len(second.output_token_ids) == 60
    assert_no_leaks(server)


async def test_a_request_aborted_during_its_lookup_leaks_no_lease():
    injector = FaultInjector(None, "hang")
    async with running_server(chunk_size=32, l1_size="16MiB", faults=injector) as server:
        shared = prompt(96)

        def scenario():
            with simulated_engine(server.url, prefix_caching=False) as engine:
                engine.add_request("first", [*shared, 1])
                engine.run()
                injector.point = "lookup.before_scan"
                engine.add_request("second", [*shared, 2])
                engine.step()
                trio.from_thread.run(injector.reached.wait)
                engine.abort("second")
                # Anything the abort sent reaches the server while the lookup still hangs.
                engine.wait_for_scheduler_calls(at_most=1)
                trio.from_thread.run_sync(injector.release.set)
                engine.run()
                assert_sound(engine)

        await trio.to_thread.run_sync(scenario)
        assert injector.fired == 1
        assert_no_leaks(server)
        assert len(server.engine.sessions) == 0


async def test_a_request_aborted_during_its_load_leaks_no_lease_and_keeps_its_blocks_until_reported():
    injector = FaultInjector(None, "hang")
    async with running_server(chunk_size=32, l1_size="16MiB", faults=injector) as server:
        shared = prompt(96)

        def scenario():
            with simulated_engine(server.url, prefix_caching=False) as engine:
                engine.add_request("first", [*shared, 1])
                engine.run()
                injector.point = "retrieve.before_copy"
                second = engine.add_request("second", [*shared, 2])
                engine.run(until=lambda: second.status is Status.WAITING_FOR_REMOTE_KVS)
                trio.from_thread.run(injector.reached.wait)
                engine.abort("second")
                assert not engine.idle()  # the load may still write the blocks: vLLM keeps them
                trio.from_thread.run_sync(injector.release.set)
                engine.run()
                assert_sound(engine)

        await trio.to_thread.run_sync(scenario)
        assert_no_leaks(server)


async def test_a_request_aborted_while_running_leaks_nothing(server):
    def scenario():
        with simulated_engine(server.url, prefix_caching=False) as engine:
            request = engine.add_request("r", prompt(100), max_new_tokens=50)
            engine.run(until=lambda: len(request.output_token_ids) >= 10)
            engine.abort("r")
            engine.run()
            assert_sound(engine)

    await trio.to_thread.run_sync(scenario)
    assert_no_leaks(server)
    assert len(server.engine.sessions) == 0


# ---------------------------------------------------------------- failed loads


@pytest.mark.parametrize("async_load", [True, False])
async def test_a_failed_retrieve_reports_exactly_its_blocks_and_stores_no_wrong_kv(async_load):
    fault = FailOnce()
    async with running_server(chunk_size=32, l1_size="16MiB", faults=fault) as server:
        shared = prompt(96)
        plans: list[StepPlan] = []

        def scenario():
            with simulated_engine(
                server.url, prefix_caching=False, async_load=async_load, stores_within_step=True
            ) as engine:
                engine.add_request("first", [*shared, *prompt(40, seed=1)])
                engine.run()
                fault.point = "retrieve.before_copy"
                engine.on_plan = plans.append
                second = engine.add_request("second", [*shared, *prompt(40, seed=2)])
                engine.run()
                engine.on_plan = None
                # Whatever second stored must be right: a third request loading all of it checks.
                third = engine.add_request("third", list(second.all_token_ids))
                engine.run()
                assert_sound(engine)
                return engine, second, third

        engine, second, third = await trio.to_thread.run_sync(scenario)
        assert fault.fired == 1
        first_retrieve = next(r for plan in plans for r in plan.retrieves)
        assert engine.load_error_reports[0] == set(first_retrieve.block_ids)
        assert second.load_errors == 1
        assert third.external_tokens == 128
        assert_no_leaks(server)


async def test_a_partial_retrieve_reports_exactly_the_blocks_it_did_not_fill(server):
    shared = prompt(128)
    plans: list[StepPlan] = []

    def evict_chunks_from_the_third_on(plan: StepPlan) -> None:
        if not plan.retrieves:
            return
        plans.append(plan)
        # The lease of chunks 2-3 ends, so they can be evicted before the retrieve reads them.
        with BlockingClient.connect(server.url) as client:
            client.release("second", "", 64)
        trio.from_thread.run_sync(server.engine.l1.evict_to, 0)

    def scenario():
        with simulated_engine(server.url, prefix_caching=False) as engine:
            engine.add_request("first", [*shared, 1])
            engine.run()
            engine.on_plan = evict_chunks_from_the_third_on
            second = engine.add_request("second", [*shared, *prompt(20, seed=2)])
            engine.run()
            assert_sound(engine)
            return engine, second

    engine, second = await trio.to_thread.run_sync(scenario)
    ((retrieve,),) = [plan.retrieves for plan in plans]
    assert engine.load_error_reports == [set(retrieve.block_ids[4:])]
    assert second.external_tokens == 128
    assert second.computed_tokens == 148 - 64 + DECODE_STEPS
    assert_no_leaks(server)


# ---------------------------------------------------------------- start-up and lookups


async def test_lookup_answers_none_while_the_server_works_then_a_count():
    injector = FaultInjector(None, "hang")
    async with running_server(chunk_size=32, l1_size="16MiB", faults=injector) as server:
        shared = prompt(96)

        def scenario():
            with simulated_engine(server.url, prefix_caching=False) as engine:
                engine.add_request("first", [*shared, 1])
                engine.run()
                injector.point = "lookup.before_scan"
                request = FakeRequest("probe", [*shared, 2])
                answers = [engine.scheduler.get_num_new_matched_tokens(request, 0)]
                trio.from_thread.run(injector.reached.wait)
                answers.append(engine.scheduler.get_num_new_matched_tokens(request, 0))
                trio.from_thread.run_sync(injector.release.set)
                engine.scheduler.drain()
                answers.append(engine.scheduler.get_num_new_matched_tokens(request, 0))
                engine.scheduler.request_finished(request)
                return answers

        answers = await trio.to_thread.run_sync(scenario)
        assert answers == [(None, False), (None, False), (96, True)]
        assert_no_leaks(server)


@pytest.mark.parametrize("side", ["scheduler", "worker"])
async def test_a_chunk_size_that_is_not_a_multiple_of_the_block_size_stops_start_up(side):
    async with running_server(chunk_size=48, l1_size="16MiB") as server:
        config = ConnectorConfig(url=server.url, connect_timeout_s=0)

        def start():
            if side == "scheduler":
                SchedulerLogic.connect(config, model="m", world_size=1, block_size=32)
            else:
                WorkerLogic.connect(config, world_size=1, rank=0, block_size=32, instance_id="w")

        with pytest.raises(ValueError, match=r"chunk size \(48 tokens\) is not a multiple of vLLM's block"):
            await trio.to_thread.run_sync(start)


async def test_start_up_names_the_url_when_no_server_answers(tmp_path):
    config = ConnectorConfig(url=f"ipc://{tmp_path}/none.sock", connect_timeout_s=0, timeout_s=1)

    def start():
        SchedulerLogic.connect(config, model="m", world_size=1, block_size=16)

    with pytest.raises(ConnectionError, match=r"none\.sock"):
        await trio.to_thread.run_sync(start)


# ---------------------------------------------------------------- bursts


async def test_a_burst_sharing_a_prefix_computes_it_once_and_the_others_load_it(server):
    shared = prompt(96)
    prompts = {f"r{i}": [*shared, *prompt(10 + i, seed=10 + i)] for i in range(4)}

    def scenario(salted: bool):
        with simulated_engine(server.url, prefix_caching=False) as engine:
            requests = [
                engine.add_request(rid, tokens, cache_salt=rid if salted else None)
                for rid, tokens in prompts.items()
            ]
            engine.run()  # all four arrive before any step: their lookups all go out at once
            assert_sound(engine)
            return requests

    # Each request under a salt of its own shares nothing: the reference outputs.
    reference = {r.request_id: r.output_token_ids for r in await trio.to_thread.run_sync(scenario, True)}
    burst = await trio.to_thread.run_sync(scenario, False)
    assert sorted(r.external_tokens for r in burst) == [0, 96, 96, 96]
    assert {r.request_id: r.output_token_ids for r in burst} == reference
    assert server.engine.status().inflight_hits >= 3 * 3  # three requests found three chunks each
    assert_no_leaks(server)
