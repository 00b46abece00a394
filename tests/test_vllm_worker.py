"""WorkerLogic, the worker side of the vLLM connector, against a recording client.

Chunks are 32 tokens, vLLM blocks 16: a chunk is two blocks.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from trio_kv.keys import pack_tokens
from trio_kv.protocol import RegisterKVCache
from trio_kv.vllm import worker as worker_module
from trio_kv.vllm.metadata import RetrievePlan, StepPlan, StorePlan

from .vllm_fakes import CHUNK, FakeClient, FakeEvents, tokens, worker_logic


def retrieve(request_id, n_tokens, block_ids, *, skip=0, is_async=True, salt=""):
    return RetrievePlan(request_id, "m", salt, pack_tokens(tokens(n_tokens)), block_ids, skip, is_async)


def store(request_id, n_tokens, block_ids, *, start=0, salt=""):
    return StorePlan(request_id, "m", salt, pack_tokens(tokens(n_tokens)), block_ids, start)


def stored(worker, plan):
    """Submit the plan's stores and wait for them."""
    worker.wait_for_save(plan)
    worker.drain()


BLOCKS = list(range(10, 18))  # four chunks


def test_saves_are_reported_only_for_requests_vllm_has_finished():
    worker = worker_logic(FakeClient())
    stored(worker, StepPlan(stores=[store("a", 64, BLOCKS[:4]), store("b", 64, BLOCKS[4:])]))
    assert worker.get_finished(set()) == (None, None)
    assert worker.get_finished({"a"}) == ({"a"}, None)


def test_a_save_is_reported_once():
    worker = worker_logic(FakeClient())
    stored(worker, StepPlan(stores=[store("a", 64, BLOCKS[:4])]))
    assert worker.get_finished({"a"}) == ({"a"}, None)
    assert worker.get_finished({"a"}) == (None, None)
    assert worker.get_finished(set()) == (None, None)


def test_a_save_is_reported_once_its_last_store_has_returned():
    client = FakeClient()
    client.store_gate = threading.Event()
    worker = worker_logic(client)
    worker.wait_for_save(StepPlan(stores=[store("a", 64, BLOCKS[:4])]))
    assert worker.get_finished({"a"}) == (None, None)
    client.store_gate.set()
    worker.drain()
    # vLLM named it finished in an earlier call: this one reports it.
    assert worker.get_finished(set()) == ({"a"}, None)


def test_requests_without_stores_are_not_reported():
    worker = worker_logic(FakeClient())
    assert worker.get_finished({"x"}) == (None, None)
    assert worker.get_finished(set()) == (None, None)


def test_the_session_of_a_saved_request_ends_after_its_stores():
    client = FakeClient()
    worker = worker_logic(client)
    stored(worker, StepPlan(stores=[store("a", 64, BLOCKS[:4], salt="t")]))
    worker.get_finished({"a"})
    worker.drain()
    assert client.of("end_session") == [("end_session", "a", "t")]


def test_async_loads_are_reported_once_as_they_complete():
    worker = worker_logic(FakeClient())
    worker.start_load_kv(StepPlan(retrieves=[retrieve("a", 64, BLOCKS[:4])]))
    worker.drain()
    assert worker.get_finished(set()) == (None, {"a"})
    assert worker.get_finished(set()) == (None, None)


def test_synchronous_loads_finish_inside_start_load_kv_and_are_not_reported():
    client = FakeClient()
    worker = worker_logic(client)
    worker.start_load_kv(StepPlan(retrieves=[retrieve("a", 64, BLOCKS[:4], is_async=False)]))
    assert len(client.of("retrieve")) == 1
    assert worker.stats.chunks_loaded == 2
    assert worker.get_finished(set()) == (None, None)


def test_retrieves_carry_the_plan():
    client = FakeClient()
    worker = worker_logic(client)
    worker.start_load_kv(StepPlan(retrieves=[retrieve("a", 128, BLOCKS, skip=48, salt="t")]))
    worker.drain()
    ((_, request),) = client.of("retrieve")
    assert (request.instance_id, request.block_ids, request.skip_first_n_tokens) == ("w0", BLOCKS, 48)
    key = request.key
    assert (key.model, key.rank, key.request_id, key.cache_salt) == ("m", 0, "a", "t")


def test_a_partial_retrieve_reports_exactly_the_blocks_it_did_not_fill():
    client = FakeClient()
    client.retrieve_hits = 2 * CHUNK
    worker = worker_logic(client)
    worker.start_load_kv(StepPlan(retrieves=[retrieve("a", 128, BLOCKS, skip=16)]))
    worker.drain()
    assert worker.get_finished(set()) == (None, {"a"})
    assert worker.get_block_ids_with_load_errors() == set(BLOCKS[4:])
    assert worker.get_block_ids_with_load_errors() == set()


def test_a_failed_retrieve_reports_every_block_it_was_to_fill_but_not_vllms_own():
    client = FakeClient()
    client.retrieve_error = TimeoutError("no reply")
    worker = worker_logic(client)
    worker.start_load_kv(StepPlan(retrieves=[retrieve("a", 128, BLOCKS, skip=3 * 16)]))
    worker.drain()
    # Failed loads are still reported finished, with their blocks, in the same call or earlier.
    assert worker.get_block_ids_with_load_errors() == set(BLOCKS[3:])
    assert worker.get_finished(set()) == (None, {"a"})


def test_a_complete_retrieve_reports_no_blocks():
    worker = worker_logic(FakeClient())
    worker.start_load_kv(StepPlan(retrieves=[retrieve("a", 128, BLOCKS)]))
    worker.drain()
    assert worker.get_block_ids_with_load_errors() == set()


def test_stores_reading_blocks_a_synchronous_load_did_not_fill_are_dropped():
    client = FakeClient()
    client.retrieve_hits = CHUNK
    worker = worker_logic(client)
    plan = StepPlan(
        retrieves=[retrieve("a", 64, BLOCKS[:4], is_async=False)],
        stores=[
            store("a", 96, BLOCKS[:6]),
            store("b", 64, [BLOCKS[0], BLOCKS[1], BLOCKS[2], 40]),  # shares a's unfilled block
            store("c", 64, [50, 51, 52, 53]),
        ],
    )
    worker.start_load_kv(plan)
    stored(worker, plan)
    assert [request.key.request_id for _, request in client.of("store")] == ["c"]
    assert worker.stats.stores_dropped == 2
    # vLLM still hears that their saves are over, so it frees the blocks.
    assert worker.get_finished({"a", "b", "c"}) == ({"a", "b", "c"}, None)


def test_a_failed_load_drops_stores_of_its_own_step_only():
    client = FakeClient()
    client.retrieve_hits = 0
    worker = worker_logic(client)
    worker.start_load_kv(StepPlan(retrieves=[retrieve("a", 64, BLOCKS[:4], is_async=False)]))
    stored(worker, StepPlan(stores=[store("a", 64, BLOCKS[:4])]))
    stored(worker, StepPlan(stores=[store("a", 64, BLOCKS[:4])]))
    assert len(client.of("store")) == 1


def test_an_ipc_event_is_recorded_before_each_steps_stores_and_retrieves():
    client = FakeClient()
    worker = worker_logic(client)
    events = FakeEvents(client)
    worker.register(RegisterKVCache("w0", 16, [], "", 0), events=events)
    worker.start_load_kv(StepPlan(retrieves=[retrieve("a", 64, BLOCKS[:4], is_async=False)]))
    stored(worker, StepPlan(stores=[store("b", 64, BLOCKS[4:]), store("c", 64, [1, 2, 3, 4])]))
    stored(worker, StepPlan())
    kinds = [call[0] for call in client.calls if call[0] != "store_done"]
    assert kinds == ["register", "record_event", "retrieve", "record_event", "store", "store"]
    requests = [call[1] for call in client.of("retrieve") + client.of("store")]
    assert {request.ipc_event for request in requests} == {FakeEvents.handle}


def test_the_cpu_path_sends_no_event():
    client = FakeClient()
    worker = worker_logic(client)
    stored(worker, StepPlan(stores=[store("b", 64, BLOCKS[4:])]))
    ((_, request),) = client.of("store")
    assert request.ipc_event == b""


def test_handle_preemptions_waits_for_the_stores_still_reading_the_freed_blocks():
    client = FakeClient()
    client.store_gate = threading.Event()
    worker = worker_logic(client)
    worker.wait_for_save(StepPlan(stores=[store("a", 64, BLOCKS[:4])]))

    def open_gate_once_the_store_runs() -> None:
        client.store_started.wait()
        client.store_gate.set()

    opener = threading.Thread(target=open_gate_once_the_store_runs)
    opener.start()
    worker.handle_preemptions(["a"])
    assert client.of("store_done") == [("store_done", "a")]
    opener.join()


def test_shutdown_finishes_the_calls_unregisters_and_disconnects():
    client = FakeClient()
    worker = worker_logic(client)
    events = FakeEvents(client)
    worker.register(RegisterKVCache("w0", 16, [], "", 0), events=events)
    worker.wait_for_save(StepPlan(stores=[store("a", 64, BLOCKS[:4])]))
    worker.shutdown()
    assert client.calls[-1] == ("unregister", "w0")
    assert client.of("store_done")
    assert events.closed and client.closed


class CudaTensor:
    """Enough of a CUDA tensor for ``register_kv_caches`` to take the CUDA path."""

    is_cuda = True

    def __init__(self, address: int) -> None:
        self.address = address
        self.shape = (2, 64, 16, 2, 32)

    def data_ptr(self) -> int:
        return self.address

    def stride(self) -> tuple[int, ...]:
        return (65536, 1024, 64, 32, 1)


def test_cuda_kv_caches_are_registered_by_cuda_ipc_with_their_event(monkeypatch):
    client = FakeClient()
    worker = worker_logic(client)
    exported = {}

    def fake_export(kv_caches, *, block_size, num_blocks):
        exported.update(layers=list(kv_caches), block_size=block_size, num_blocks=num_blocks)
        events = FakeEvents(client)
        events.register_request = lambda instance_id: RegisterKVCache(instance_id, block_size, [], "", 0)
        return events

    monkeypatch.setattr(worker_module, "cuda_kv_cache_export", fake_export)
    worker.register_kv_caches({"layer.0": CudaTensor(1 << 20), "layer.1": CudaTensor(1 << 21)}, num_blocks=64)
    assert exported == {"layers": ["layer.0", "layer.1"], "block_size": 16, "num_blocks": 64}
    stored(worker, StepPlan(stores=[store("a", 64, BLOCKS[:4])]))
    ((_, request),) = client.of("store")
    assert request.ipc_event == FakeEvents.handle


def test_cuda_export_hands_every_distinct_tensor_and_its_block_dimension_to_the_ipc_layer(monkeypatch):
    ipc = pytest.importorskip("trio_kv.export.ipc")
    from trio_kv.vllm.registration import cuda_kv_cache_export

    seen = SimpleNamespace()

    def from_tensors(tensors, block_dim, block_size):
        seen.tensors, seen.block_dim, seen.block_size = tensors, block_dim, block_size
        return "export"

    monkeypatch.setattr(ipc.CudaKVCacheExport, "from_tensors", staticmethod(from_tensors))
    shared = CudaTensor(1 << 20)
    result = cuda_kv_cache_export(
        {"layer.0": shared, "layer.1": CudaTensor(1 << 21), "layer.2": shared}, block_size=16, num_blocks=64
    )
    assert result == "export"
    assert [t.data_ptr() for t in seen.tensors] == [1 << 20, 1 << 21]
    assert (seen.block_dim, seen.block_size) == (1, 16)


def test_cpu_kv_caches_outside_shared_memory_are_registered_through_a_staging_mirror():
    worker = worker_logic(FakeClient())
    private = torch.zeros(2, 64, 16, 2, 8)
    worker.register_kv_caches({"layer.0": private}, num_blocks=64)
    assert worker.registered and worker.staging is not None
    [spec] = worker.staging.specs
    assert (spec.shape, spec.block_dim) == ([2, 64, 16, 2, 8], 1)
    worker.shutdown()


def test_a_kv_layout_trio_kv_does_not_know_fails_registration_clearly():
    worker = worker_logic(FakeClient())
    with pytest.raises(ValueError, match="does not know this layout"):
        worker.register_kv_caches({"layer.0": torch.zeros(7, 9, 16)}, num_blocks=64)
    assert not worker.registered
