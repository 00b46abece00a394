"""SchedulerLogic, the scheduler side of the vLLM connector, against a recording client.

Chunks are 32 tokens, vLLM blocks 16. Server calls run in background threads;
``drain`` waits for them before a test reads what was sent.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from trio_kv.keys import pack_tokens
from trio_kv.vllm import request_state
from trio_kv.vllm.metadata import ScheduledRequest, SchedulerStep
from trio_kv.vllm.request_state import RequestState, key_model, tenant_salt

from .vllm_fakes import BLOCK, CHUNK, FakeClient, FakeRequest, scheduler_logic, tokens


def looked_up(logic, request, local=0):
    """Ask until the lookup has answered (the first call only submits it)."""
    assert logic.get_num_new_matched_tokens(request, local) == (None, False)
    logic.drain()
    return logic.get_num_new_matched_tokens(request, local)


def step(*requests, preempted=()):
    return SchedulerStep(requests=list(requests), preempted_req_ids=list(preempted))


def blocks(n, first=100):
    return list(range(first, first + n))


def test_lookup_answers_none_while_in_flight_then_the_hit():
    client = FakeClient()
    client.lookup_hits, client.lookup_gate = 3 * CHUNK, threading.Event()
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(100))
    assert logic.get_num_new_matched_tokens(request, 0) == (None, False)
    assert logic.get_num_new_matched_tokens(request, 0) == (None, False)
    client.lookup_gate.set()
    logic.drain()
    assert logic.get_num_new_matched_tokens(request, 0) == (3 * CHUNK, True)
    assert len(client.of("lookup")) == 1


def test_the_lookup_names_only_whole_chunks_of_the_prompt():
    client = FakeClient()
    logic = scheduler_logic(client)
    looked_up(logic, FakeRequest("r", tokens(100)))
    ((_, key),) = client.of("lookup")
    assert key.tokens == pack_tokens(tokens(96))
    assert key.rank is None and key.request_id == "r"


def test_a_lookup_claims_what_it_misses_when_the_connector_stores():
    # Lookups of other requests then wait for this request's stores instead of missing.
    client = FakeClient()
    looked_up(scheduler_logic(client), FakeRequest("r", tokens(100)))
    assert client.claims == [True]


def test_a_consumer_only_claims_nothing():
    # It never stores: another request waiting for its chunks would wait in vain.
    client = FakeClient()
    looked_up(scheduler_logic(client, save=False), FakeRequest("r", tokens(100)))
    assert client.claims == [False]


def test_the_hit_counts_from_vllms_own_blocks():
    client = FakeClient()
    client.lookup_hits = 3 * CHUNK
    logic = scheduler_logic(client)
    assert looked_up(logic, FakeRequest("r", tokens(100)), local=BLOCK) == (3 * CHUNK - BLOCK, True)


def test_the_last_prompt_token_is_left_to_vllm():
    client = FakeClient()
    client.lookup_hits = 3 * CHUNK
    logic = scheduler_logic(client)
    assert looked_up(logic, FakeRequest("r", tokens(3 * CHUNK))) == (3 * CHUNK - 1, True)


def test_no_lookup_when_vllm_holds_every_whole_chunk():
    client = FakeClient()
    logic = scheduler_logic(client)
    assert logic.get_num_new_matched_tokens(FakeRequest("r", tokens(70)), 4 * BLOCK) == (0, False)
    logic.drain()
    assert client.of("lookup") == []


def test_a_miss_is_zero_and_synchronous():
    client = FakeClient()
    logic = scheduler_logic(client)
    assert looked_up(logic, FakeRequest("r", tokens(100))) == (0, False)


def test_synchronous_loads_when_async_load_is_off():
    client = FakeClient()
    client.lookup_hits = 2 * CHUNK
    logic = scheduler_logic(client, async_load=False)
    assert looked_up(logic, FakeRequest("r", tokens(100))) == (2 * CHUNK, False)


def test_a_failed_lookup_is_a_miss():
    client = FakeClient()
    client.lookup_error = TimeoutError("no reply")
    logic = scheduler_logic(client)
    assert looked_up(logic, FakeRequest("r", tokens(100))) == (0, False)


def test_a_lookup_without_an_answer_in_time_is_a_miss():
    client = FakeClient()
    client.lookup_gate = threading.Event()
    now = [0.0]
    logic = scheduler_logic(client, lookup_timeout_s=5.0, clock=lambda: now[0])
    request = FakeRequest("r", tokens(100))
    assert logic.get_num_new_matched_tokens(request, 0) == (None, False)
    now[0] = 4.9
    assert logic.get_num_new_matched_tokens(request, 0) == (None, False)
    now[0] = 5.0
    assert logic.get_num_new_matched_tokens(request, 0) == (0, False)
    client.lookup_gate.set()


def test_allocation_releases_leases_on_chunks_vllm_holds_and_skips_them_in_the_retrieve():
    client = FakeClient()
    client.lookup_hits = 4 * CHUNK
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(130))
    local = 3 * BLOCK  # vLLM's prefix cache: chunk 0 and half of chunk 1
    matched, _ = looked_up(logic, request, local)
    logic.update_state_after_alloc(request, blocks(9), matched)
    logic.drain()
    assert client.of("release") == [("release", "r", "", 0, CHUNK)]
    (retrieve,) = logic.build_connector_meta(step()).retrieves
    assert retrieve.skip_tokens == local
    assert retrieve.tokens == pack_tokens(tokens(4 * CHUNK))
    assert retrieve.block_ids == blocks(8)
    assert retrieve.is_async


def test_allocation_releases_the_leases_past_the_planned_load():
    client = FakeClient()
    client.lookup_hits = 4 * CHUNK
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(130))
    looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(2), 20)  # vLLM takes fewer tokens than offered
    logic.drain()
    assert client.of("release") == [("release", "r", "", CHUNK, None)]
    (retrieve,) = logic.build_connector_meta(step()).retrieves
    assert retrieve.tokens == pack_tokens(tokens(CHUNK))
    assert retrieve.block_ids == blocks(2)


def test_no_load_releases_every_lease():
    client = FakeClient()
    client.lookup_hits = 2 * CHUNK
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(100))
    looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(7), 0)
    logic.drain()
    assert client.of("release") == [("release", "r", "", 0, None)]
    assert logic.build_connector_meta(step()).retrieves == []


def test_a_retrieve_is_planned_once():
    client = FakeClient()
    client.lookup_hits = 2 * CHUNK
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(100))
    matched, _ = looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(4), matched)
    logic.update_state_after_alloc(request, blocks(7), 0)  # vLLM's second call, after the async load
    assert len(logic.build_connector_meta(step()).retrieves) == 1
    assert logic.build_connector_meta(step()).retrieves == []


def test_stores_cover_the_whole_chunks_each_step_completes():
    logic = scheduler_logic(FakeClient())
    request = FakeRequest("r", tokens(100))
    looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(5), 0)
    first = logic.build_connector_meta(step(ScheduledRequest("r", 0, 70, blocks(5), True)))
    (store,) = first.stores
    assert (store.start, store.tokens, store.block_ids) == (0, pack_tokens(tokens(64)), blocks(4))
    second = logic.build_connector_meta(step(ScheduledRequest("r", 70, 30, blocks(2, first=105))))
    (store,) = second.stores
    assert (store.start, store.tokens) == (64, pack_tokens(tokens(96)))
    assert store.block_ids == blocks(6)
    request.all_token_ids.append(7)
    assert logic.build_connector_meta(step(ScheduledRequest("r", 100, 1))).stores == []


def test_tokens_vllm_has_not_sampled_yet_are_not_stored():
    logic = scheduler_logic(FakeClient())
    request = FakeRequest("r", tokens(60))
    looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(5), 0)
    # 60 prompt tokens plus 4 draft tokens computed: only 60 ids are known, so one chunk.
    (store,) = logic.build_connector_meta(step(ScheduledRequest("r", 0, 64, blocks(4), True))).stores
    assert store.tokens == pack_tokens(tokens(CHUNK))


def test_a_rewound_request_stores_its_recomputed_chunks_again():
    logic = scheduler_logic(FakeClient())
    request = FakeRequest("r", tokens(130))
    looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(9), 0)
    logic.build_connector_meta(step(ScheduledRequest("r", 0, 100, blocks(9), True)))
    # A load failed: vLLM goes back to token 40 and computes again.
    (store,) = logic.build_connector_meta(step(ScheduledRequest("r", 40, 90))).stores
    assert store.start == CHUNK


def test_each_token_id_is_packed_once_for_the_lookup_the_retrieve_and_the_stores(monkeypatch):
    packed_ids = []

    def counting_pack(ids):
        packed_ids.extend(ids)
        return pack_tokens(ids)

    monkeypatch.setattr(request_state, "pack_tokens", counting_pack)
    client = FakeClient()
    client.lookup_hits = 2 * CHUNK
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(130))
    matched, _ = looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(9), matched)
    first = logic.build_connector_meta(step(ScheduledRequest("r", 64, 66, blocks(9), True)))
    request.all_token_ids += tokens(40, offset=1000)  # decoding appends ids
    second = logic.build_connector_meta(step(ScheduledRequest("r", 130, 40, blocks(2, first=109))))
    ((_, key),) = client.of("lookup")
    assert key.tokens == pack_tokens(tokens(128))
    assert first.retrieves[0].tokens == pack_tokens(tokens(64))
    assert first.stores[0].tokens == pack_tokens(tokens(128))
    assert second.stores[0].tokens == pack_tokens(request.all_token_ids[:160])
    assert packed_ids == request.all_token_ids[:160]  # every id once, in order


def test_packed_tokens_are_packed_again_when_the_ids_changed_under_them():
    request = FakeRequest("r", tokens(64))
    state = RequestState(request, "m")
    assert state.packed_tokens(64) == pack_tokens(tokens(64))
    request.all_token_ids[63] = 999_999
    assert state.packed_tokens(64) == pack_tokens(request.all_token_ids)
    request.all_token_ids[:] = tokens(10, offset=5)  # shorter than what was packed
    assert state.packed_tokens(10) == pack_tokens(tokens(10, offset=5))


def test_the_cache_salt_is_in_every_call():
    client = FakeClient()
    client.lookup_hits = 3 * CHUNK
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(130), cache_salt="tenant-1")
    matched, _ = looked_up(logic, request, local=2 * BLOCK + BLOCK)
    logic.update_state_after_alloc(request, blocks(9), matched - BLOCK)
    plan = logic.build_connector_meta(step(ScheduledRequest("r", 80, 50, blocks(9), True)))
    logic.request_finished(request)
    logic.drain()
    ((_, key),) = client.of("lookup")
    assert key.cache_salt == "tenant-1"
    assert {call[2] for call in client.of("release")} == {"tenant-1"}
    assert client.of("end_session") == [("end_session", "r", "tenant-1")]
    assert [p.cache_salt for p in plan.retrieves + plan.stores] == ["tenant-1", "tenant-1"]


def test_a_salt_the_server_refuses_becomes_a_digest_that_keeps_tenants_apart():
    assert tenant_salt(None) == tenant_salt("") == ""
    assert tenant_salt("tenant-1") == "tenant-1"
    slash, other = tenant_salt("a/b"), tenant_salt("a/c")
    assert slash.startswith("~") and "/" not in slash
    assert slash != other
    assert len(tenant_salt("x" * 500)) <= 128


def test_lora_and_multimodal_inputs_get_a_namespace_of_their_own():
    plain = FakeRequest("r", tokens(10))
    lora = FakeRequest("r", tokens(10))
    lora.lora_request = SimpleNamespace(lora_name="sql", lora_path="/adapters/sql")
    image = FakeRequest("r", tokens(10))
    image.mm_features = [SimpleNamespace(identifier="img-1", mm_position=SimpleNamespace(offset=3, length=5))]
    moved = FakeRequest("r", tokens(10))
    moved.mm_features = [SimpleNamespace(identifier="img-1", mm_position=SimpleNamespace(offset=4, length=5))]
    models = [key_model("m", request) for request in (plain, lora, image, moved)]
    assert models[0] == "m"
    assert len(set(models)) == 4
    assert all(model.startswith("m#") for model in models[1:])
    assert key_model("m", image) == models[2]


def test_a_request_with_prompt_embeddings_is_neither_looked_up_nor_stored():
    client = FakeClient()
    logic = scheduler_logic(client)
    request = FakeRequest("r", [0] * 100)
    request.prompt_embeds = object()
    assert logic.get_num_new_matched_tokens(request, 0) == (0, False)
    logic.update_state_after_alloc(request, blocks(7), 0)
    assert logic.build_connector_meta(step(ScheduledRequest("r", 0, 100, blocks(7), True))).stores == []
    logic.drain()
    assert client.calls == []


def test_a_lora_request_is_looked_up_and_stored_under_its_namespace():
    client = FakeClient()
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(100))
    request.lora_request = SimpleNamespace(lora_name="sql", lora_path="/adapters/sql")
    looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(7), 0)
    (store,) = logic.build_connector_meta(step(ScheduledRequest("r", 0, 100, blocks(7), True))).stores
    ((_, key),) = client.of("lookup")
    assert key.model == store.model == key_model("m", request) != "m"


def test_request_finished_ends_the_session_and_says_no_save_is_pending_without_stores():
    client = FakeClient()
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(100))
    looked_up(logic, request)
    assert logic.request_finished(request) is False
    logic.drain()
    assert client.of("end_session") == [("end_session", "r", "")]


def test_request_finished_says_a_save_is_pending_after_a_store_was_planned():
    logic = scheduler_logic(FakeClient())
    request = FakeRequest("r", tokens(100))
    looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(7), 0)
    logic.build_connector_meta(step(ScheduledRequest("r", 0, 100, blocks(7), True)))
    assert logic.request_finished(request) is True


def test_a_request_aborted_before_allocation_releases_its_leases_with_the_session():
    client = FakeClient()
    client.lookup_hits = 3 * CHUNK
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(100), cache_salt="t")
    looked_up(logic, request)
    assert logic.request_finished(request) is False
    logic.drain()
    assert client.of("end_session") == [("end_session", "r", "t")]


def test_a_request_that_ends_during_its_lookup_ends_the_session_after_the_lookup():
    client = FakeClient()
    client.lookup_gate = threading.Event()
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(100))
    logic.get_num_new_matched_tokens(request, 0)
    logic.request_finished(request)
    assert client.of("end_session") == []
    client.lookup_gate.set()
    logic.drain()
    kinds = [call[0] for call in client.calls]
    assert kinds == ["lookup", "lookup_returned", "end_session"]


def test_a_preempted_request_is_looked_up_again_with_its_output_tokens():
    client = FakeClient()
    logic = scheduler_logic(client)
    request = FakeRequest("r", tokens(60))
    looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(4), 0)
    request.all_token_ids += tokens(40, offset=1000)
    logic.build_connector_meta(step(preempted=["r"]))
    assert looked_up(logic, request) == (0, False)
    _, (_, second) = client.of("lookup")
    assert second.tokens == pack_tokens(request.all_token_ids[:96])


def test_a_producer_only_never_looks_up():
    client = FakeClient()
    logic = scheduler_logic(client, load=False)
    assert logic.get_num_new_matched_tokens(FakeRequest("r", tokens(100)), 0) == (0, False)
    logic.drain()
    assert client.of("lookup") == []


def test_a_consumer_only_never_stores():
    logic = scheduler_logic(FakeClient(), save=False)
    request = FakeRequest("r", tokens(100))
    looked_up(logic, request)
    logic.update_state_after_alloc(request, blocks(7), 0)
    assert logic.build_connector_meta(step(ScheduledRequest("r", 0, 100, blocks(7), True))).stores == []
    assert logic.request_finished(request) is False


def test_a_chunk_that_is_not_whole_blocks_stops_start_up():
    with pytest.raises(ValueError, match="not a multiple of vLLM's block size"):
        scheduler_logic(FakeClient(chunk_size=48), block_size=32)
