"""Reading vLLM's SchedulerOutput (0.33.0 and older shapes) without importing vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trio_kv.vllm.metadata import ScheduledRequest
from trio_kv.vllm.translate import scheduler_step, single_group


def scheduler_output(*, cached, preempted=None):
    new = SimpleNamespace(req_id="new", num_computed_tokens=32, block_ids=([1, 2, 3],))
    return SimpleNamespace(
        scheduled_new_reqs=[new],
        scheduled_cached_reqs=cached,
        num_scheduled_tokens={"new": 16, "old": 1, "back": 40},
        preempted_req_ids=preempted,
    )


def test_new_and_cached_requests_as_vllm_0_33_sends_them():
    cached = SimpleNamespace(
        req_ids=["old", "back"],
        resumed_req_ids={"back"},
        new_block_ids=[None, ([7, 8],)],
        num_computed_tokens=[100, 0],
    )
    step = scheduler_step(scheduler_output(cached=cached, preempted={"z", "y"}))
    assert step.requests == [
        ScheduledRequest("new", 32, 16, [1, 2, 3], True),
        ScheduledRequest("old", 100, 1, None, False),
        ScheduledRequest("back", 0, 40, [7, 8], True),
    ]
    assert step.preempted_req_ids == ["y", "z"]


def test_older_releases_flag_resumed_requests_in_a_list():
    cached = SimpleNamespace(
        req_ids=["old", "back"],
        resumed_from_preemption=[False, True],
        new_block_ids=[([9],), ([7, 8],)],
        num_computed_tokens=[100, 0],
    )
    step = scheduler_step(scheduler_output(cached=cached))
    assert [r.replaces_block_ids for r in step.requests] == [True, False, True]
    assert step.preempted_req_ids == []


def test_one_kv_cache_group_is_read_as_a_list():
    assert single_group(([4, 5],)) == [4, 5]
    assert single_group(()) == []
    assert single_group(None) is None


def test_hybrid_kv_cache_groups_are_refused():
    with pytest.raises(ValueError, match="one KV cache group"):
        single_group(([1], [2]))
