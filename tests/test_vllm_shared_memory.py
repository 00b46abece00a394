"""vLLM's CPU KV cache made shareable: allocated in sealed shared memory through the connector's
memory-pool context, or staged through a shared mirror when it is private memory; and a worker
that finds its registration gone (the server restarted) registers again. No vLLM import: the
KV tensors are built the way vLLM 0.32's CPU worker builds them (one flat int8 allocation,
per-layer views ``(2, num_blocks, heads, block_size, head_size)``).
"""

from __future__ import annotations

import fcntl
import logging

import pytest
import torch
import trio

from trio_kv.client import BlockingClient
from trio_kv.keys import pack_tokens
from trio_kv.testing import assert_no_leaks
from trio_kv.vllm.config import ConnectorConfig
from trio_kv.vllm.deltas import CounterDeltas
from trio_kv.vllm.metadata import RetrievePlan, StepPlan, StorePlan
from trio_kv.vllm.scheduler import SchedulerStats
from trio_kv.vllm.shared_alloc import SharedKVAllocation, _flat_cpu_bytes
from trio_kv.vllm.worker import WorkerLogic

from .conftest import BLOCK_SIZE, CHUNK_SIZE

LAYERS, NUM_BLOCKS, HEADS, HEAD_SIZE = 3, 24, 2, 16
LAYER_SHAPE = (2, NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_SIZE)
LAYER_BYTES = 2 * NUM_BLOCKS * HEADS * BLOCK_SIZE * HEAD_SIZE * 4


def vllm_cpu_kv_caches(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer float32 views of one flat int8 buffer, as vLLM's allocate_kv_cache makes them."""
    return {
        f"model.layers.{layer}.self_attn.attn": flat[layer * LAYER_BYTES : (layer + 1) * LAYER_BYTES]
        .view(torch.float32)
        .view(LAYER_SHAPE)
        for layer in range(LAYERS)
    }


def allocate(shared: bool) -> tuple[dict[str, torch.Tensor], SharedKVAllocation | None]:
    if not shared:
        return vllm_cpu_kv_caches(torch.zeros(LAYERS * LAYER_BYTES, dtype=torch.int8)), None
    allocation = SharedKVAllocation()
    with allocation:
        flat = torch.zeros(LAYERS * LAYER_BYTES, dtype=torch.int8, device=torch.device("cpu"))
    return vllm_cpu_kv_caches(flat), allocation


def worker(url: str, instance_id: str) -> WorkerLogic:
    return WorkerLogic.connect(
        ConnectorConfig(url=url, timeout_s=10),
        world_size=1,
        rank=0,
        block_size=BLOCK_SIZE,
        instance_id=instance_id,
    )


def register(logic: WorkerLogic, kv: dict[str, torch.Tensor], allocation: SharedKVAllocation | None) -> None:
    shared = allocation.mappings() if allocation is not None else []
    logic.register_kv_caches(kv, num_blocks=NUM_BLOCKS, shared=shared or None)


TOKENS = pack_tokens(list(range(2 * CHUNK_SIZE)))
SOURCE_BLOCKS, TARGET_BLOCKS = [3, 7, 1, 20], [5, 6, 11, 12]


def store_then_retrieve(url: str, source_shared: bool, target_shared: bool):
    """Fill blocks in one engine, store them, retrieve them into another; return both KV sets."""
    source_kv, source_alloc = allocate(source_shared)
    target_kv, target_alloc = allocate(target_shared)
    for tensor in source_kv.values():
        tensor.copy_(torch.randn(LAYER_SHAPE))
    source, target = worker(url, "source"), worker(url, "target")
    try:
        register(source, source_kv, source_alloc)
        register(target, target_kv, target_alloc)
        source.wait_for_save(StepPlan(stores=[StorePlan("r1", "m", "", TOKENS, SOURCE_BLOCKS, 0)]))
        source.drain()
        with BlockingClient.connect(url) as scheduler:
            scheduler.lookup(_lookup_key("r2"))
        target.start_load_kv(
            StepPlan(retrieves=[RetrievePlan("r2", "m", "", TOKENS, TARGET_BLOCKS, 0, False)])
        )
        modes = (source.staging is not None, target.staging is not None)
        return source_kv, target_kv, modes, target.get_block_ids_with_load_errors()
    finally:
        source.shutdown()
        target.shutdown()
        for allocation in (source_alloc, target_alloc):
            if allocation is not None:
                allocation.close()


def _lookup_key(request_id: str):
    from trio_kv.keys import RequestKey

    return RequestKey("m", 1, None, TOKENS, request_id=request_id)


def assert_blocks_equal(source_kv, target_kv) -> None:
    for name in source_kv:
        for src, dst in zip(SOURCE_BLOCKS, TARGET_BLOCKS):
            assert torch.equal(source_kv[name][:, src], target_kv[name][:, dst]), (name, src, dst)


def test_the_flat_cpu_kv_allocation_lands_in_a_sealed_region():
    allocation = SharedKVAllocation()
    with allocation:
        flat = torch.zeros(1 << 20, dtype=torch.int8, device=torch.device("cpu"))
        other = torch.zeros(16)  # float: not a KV allocation
    try:
        [region] = allocation.regions
        assert flat.data_ptr() == region.tensor.data_ptr() and int(flat.abs().sum()) == 0
        assert fcntl.fcntl(region.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        assert other.dtype == torch.float32
        [mapping] = allocation.mappings()
        assert (mapping.start, mapping.end, mapping.path) == (
            flat.data_ptr(),
            flat.data_ptr() + (1 << 20),
            region.path,
        )
    finally:
        allocation.close()


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((16, 4), {"dtype": torch.int8}),  # not flat
        ((16,), {"dtype": torch.float16}),
        ((16,), {"dtype": torch.int8, "device": "cuda"}),
        ((16,), {"dtype": torch.int8, "pin_memory": True}),
        ((0,), {"dtype": torch.int8}),
        ((16,), {}),  # float32 by default
    ],
)
def test_other_allocations_are_left_to_torch(args, kwargs):
    assert _flat_cpu_bytes(torch.zeros, args, kwargs) is None
    assert _flat_cpu_bytes(torch.empty, (16,), {"dtype": torch.int8}) is None


def test_the_kv_allocation_is_recognised_in_its_forms():
    for args, kwargs in [((16,), {"dtype": torch.int8}), ((torch.Size([16]),), {"dtype": torch.uint8})]:
        assert _flat_cpu_bytes(torch.zeros, args, kwargs) == 16


async def test_vllms_own_allocation_is_registered_and_blocks_round_trip_byte_exact(server):
    source_kv, target_kv, staging, errors = await trio.to_thread.run_sync(
        store_then_retrieve, server.url, True, True
    )
    assert staging == (False, False)
    assert errors == set()
    assert_blocks_equal(source_kv, target_kv)
    assert_no_leaks(server)


async def test_private_kv_memory_falls_back_to_staging_with_one_warning(server, caplog):
    caplog.set_level(logging.WARNING, logger="trio_kv.vllm")
    source_kv, target_kv, staging, errors = await trio.to_thread.run_sync(
        store_then_retrieve, server.url, False, False
    )
    assert staging == (True, True)
    assert errors == set()
    assert_blocks_equal(source_kv, target_kv)
    warnings = [r for r in caplog.records if "staging" in r.getMessage()]
    assert len(warnings) == 2  # one per worker, none per request
    assert_no_leaks(server)


async def test_a_shared_engine_and_a_staged_engine_share_chunks(server):
    source_kv, target_kv, staging, _ = await trio.to_thread.run_sync(
        store_then_retrieve, server.url, True, False
    )
    assert staging == (False, True)
    assert_blocks_equal(source_kv, target_kv)


async def test_a_worker_whose_registration_is_gone_registers_again(server):
    kv, allocation = allocate(True)
    assert allocation is not None
    logic = await trio.to_thread.run_sync(worker, server.url, "engine")
    try:
        await trio.to_thread.run_sync(register, logic, kv, allocation)
        assert list(server.engine.instances) == ["engine"]
        # The connection drops (a network blip, or the server restarting): its registration
        # goes with it, and nng redials.
        closed_before = server.server.connections.closed_count
        old_pipes = {pipe.id for pipe in logic._calls.client._sock.pipes}
        for sock in server.server._sockets:
            for pipe in sock.pipes:
                pipe.close()
        with trio.fail_after(5):
            await server.server.connections.wait_closed(closed_before + 1)
        assert server.engine.instances == {}
        with trio.fail_after(5):
            # A new pipe, not the old one the client has not yet seen go.
            while not {pipe.id for pipe in logic._calls.client._sock.pipes} - old_pipes:  # noqa: ASYNC110 -- nng redials in its own thread
                await trio.sleep(0.01)

        def store() -> None:
            logic.wait_for_save(StepPlan(stores=[StorePlan("r", "m", "", TOKENS, SOURCE_BLOCKS, 0)]))
            logic.drain()

        await trio.to_thread.run_sync(store)
        assert (logic.stats.chunks_stored, logic.stats.store_failures) == (2, 0)
        assert list(server.engine.instances) == ["engine"]  # registered again, on the new connection
    finally:
        await trio.to_thread.run_sync(logic.shutdown)
        allocation.close()


async def test_calls_fail_at_once_while_the_server_is_gone(server):
    client = await trio.to_thread.run_sync(lambda: BlockingClient.connect(server.url, timeout_s=30))
    client.fail_fast = True
    try:
        assert await trio.to_thread.run_sync(client.ping)
        await server.server.shutdown(grace_s=0)
        with trio.fail_after(5):
            while client._sock.pipes:  # noqa: ASYNC110 -- nng drops the pipe in its own thread
                await trio.sleep(0.01)
        with trio.fail_after(2), pytest.raises(ConnectionError):
            await trio.to_thread.run_sync(client.ping)
    finally:
        client.close()


def test_counter_deltas_report_changes_since_the_last_call():
    stats, deltas = SchedulerStats(), CounterDeltas()
    assert deltas.since_last(stats) == {}
    stats.lookups, stats.lookup_hit_tokens = 2, 512
    assert deltas.since_last(stats) == {"lookups": 2, "lookup_hit_tokens": 512}
    stats.lookups += 1
    assert deltas.since_last(stats) == {"lookups": 1}
    assert deltas.since_last(stats) == {}
