"""TrioKVConnector against the installed vLLM's KVConnectorBase_V1 (skipped without vLLM).

The interface was last checked against vLLM 0.33.0.
"""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from types import SimpleNamespace

import pytest
import trio

base = pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base")
output = pytest.importorskip("vllm.v1.core.sched.output")

from trio_kv.testing import assert_no_leaks, make_kv_cache  # noqa: E402
from trio_kv.vllm import TrioKVConnector  # noqa: E402
from trio_kv.vllm import connector as connector_module  # noqa: E402

Base = base.KVConnectorBase_V1
Role = base.KVConnectorRole


def test_every_abstract_method_of_the_installed_vllm_is_implemented():
    assert not TrioKVConnector.__abstractmethods__
    for name in Base.__abstractmethods__:
        assert getattr(TrioKVConnector, name) is not getattr(Base, name), name


def test_the_constructor_takes_vllm_config_role_and_kv_cache_config():
    parameters = list(inspect.signature(TrioKVConnector.__init__).parameters)
    assert parameters == ["self", "vllm_config", "role", "kv_cache_config"]
    base_parameters = list(inspect.signature(Base.__init__).parameters)
    assert parameters == base_parameters


def test_every_overridden_method_takes_the_arguments_vllm_passes():
    overridden = [
        name
        for name, member in vars(TrioKVConnector).items()
        if not name.startswith("_") and hasattr(Base, name) and callable(getattr(TrioKVConnector, name))
    ]
    assert {"get_finished", "get_block_ids_with_load_errors", "request_finished", "shutdown"} <= set(
        overridden
    )
    for name in overridden:
        ours = inspect.signature(getattr(TrioKVConnector, name)).parameters
        theirs = inspect.signature(getattr(Base, name)).parameters
        assert list(ours) == list(theirs), name


def test_it_is_a_best_effort_cache_without_sleep_mode():
    assert TrioKVConnector.supports_sleep_mode(None) is False
    assert TrioKVConnector.requires_kv_delivery.fget(None) is False


def vllm_config(url: str) -> SimpleNamespace:
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={"trio_kv.url": url, "trio_kv.connect_timeout_s": 0},
            kv_role="kv_both",
        ),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model="sim-model"),
        cache_config=SimpleNamespace(block_size=16, num_gpu_blocks=64),
    )


def new_request_data(**known):
    """vLLM's NewRequestData with ``known`` fields and None for the other required ones."""
    cls = output.NewRequestData
    values = {
        field.name: None
        for field in dataclasses.fields(cls)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    }
    values.update(known)
    return cls(**values)


def scheduler_output(request_id: str, block_ids: list[int], num_tokens: int):
    scheduled = output.SchedulerOutput.make_empty()
    scheduled.scheduled_new_reqs = [
        new_request_data(req_id=request_id, block_ids=(block_ids,), num_computed_tokens=0, mm_features=[])
    ]
    scheduled.num_scheduled_tokens = {request_id: num_tokens}
    scheduled.total_num_scheduled_tokens = num_tokens
    return scheduled


def answered(connector, request):
    """vLLM asks again on its next step; by then the lookup has returned."""
    assert connector.get_num_new_matched_tokens(request, 0) == (None, False)
    connector._scheduler.drain()
    return connector.get_num_new_matched_tokens(request, 0)


async def test_a_prefix_stored_through_the_connector_is_found_by_the_next_request(server, monkeypatch):
    monkeypatch.setattr(connector_module, "_worker_rank", lambda: 0)
    prompt = list(range(100))

    def scenario():
        with make_kv_cache(num_blocks=64, block_size=16, sealed=False) as cache:
            scheduler = TrioKVConnector(vllm_config(server.url), Role.SCHEDULER, None)
            worker = TrioKVConnector(vllm_config(server.url), Role.WORKER, None)
            try:
                worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(cache.tensors)})
                first = SimpleNamespace(request_id="first", all_token_ids=prompt, cache_salt=None)
                assert answered(scheduler, first) == (0, False)
                blocks = list(range(7))
                allocated = SimpleNamespace(get_block_ids=lambda: (blocks,))
                scheduler.update_state_after_alloc(first, allocated, 0)
                metadata = scheduler.build_connector_meta(scheduler_output("first", blocks, 100))
                metadata = pickle.loads(pickle.dumps(metadata))
                worker.bind_connector_metadata(metadata)
                worker.handle_preemptions(metadata)
                worker.start_load_kv(None)
                worker.wait_for_save()
                worker.clear_connector_metadata()
                assert scheduler.request_finished(first, blocks) == (True, None)
                worker._worker.drain()
                assert worker.get_finished({"first"}) == ({"first"}, None)
                assert worker.get_block_ids_with_load_errors() == set()
                second = SimpleNamespace(
                    request_id="second", all_token_ids=[*prompt[:96], 7], cache_salt=None
                )
                second_hit = answered(scheduler, second)
                assert scheduler.request_finished(second, []) == (False, None)
                return second_hit
            finally:
                worker.shutdown()
                scheduler.shutdown()

    assert await trio.to_thread.run_sync(scenario) == (96, True)
    assert server.engine.instances == {}
    assert_no_leaks(server)
