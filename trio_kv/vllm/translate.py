"""Read the vLLM objects the connector is handed, without importing vLLM.

vLLM's ``SchedulerOutput`` and ``KVCacheBlocks`` change between releases; this
module is the one place that knows their shape, and it reads them by attribute
so it can be tested with stand-ins. Checked against vLLM 0.33.0
(``CachedRequestData.resumed_req_ids``, ``SchedulerOutput.preempted_req_ids``)
and older releases (``resumed_from_preemption``, a list of flags).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .metadata import ScheduledRequest, SchedulerStep

HYBRID_NOT_SUPPORTED = (
    "trio-kv supports one KV cache group; run vLLM with --disable-hybrid-kv-cache-manager "
    "(models that need the hybrid KV cache manager, e.g. hybrid SSM models, are not supported)"
)


def single_group(block_ids: Sequence[Sequence[int]] | None) -> list[int] | None:
    """The block ids of the only KV cache group (vLLM passes one list per group)."""
    if block_ids is None:
        return None
    if len(block_ids) > 1:
        raise ValueError(HYBRID_NOT_SUPPORTED)
    return list(block_ids[0]) if block_ids else []


def scheduler_step(scheduler_output: Any) -> SchedulerStep:
    """The requests of this step's batch and the requests preempted in it."""
    num_scheduled = scheduler_output.num_scheduled_tokens
    requests = [
        ScheduledRequest(
            request_id=new.req_id,
            num_computed_tokens=new.num_computed_tokens,
            num_scheduled_tokens=num_scheduled.get(new.req_id, 0),
            block_ids=single_group(new.block_ids),
            replaces_block_ids=True,
        )
        for new in scheduler_output.scheduled_new_reqs
    ]
    cached = scheduler_output.scheduled_cached_reqs
    resumed_ids = getattr(cached, "resumed_req_ids", None)
    resumed_flags = getattr(cached, "resumed_from_preemption", None)
    for index, request_id in enumerate(cached.req_ids):
        if resumed_ids is not None:
            resumed = request_id in resumed_ids
        else:
            resumed = bool(resumed_flags[index]) if resumed_flags else False
        requests.append(
            ScheduledRequest(
                request_id=request_id,
                num_computed_tokens=cached.num_computed_tokens[index],
                num_scheduled_tokens=num_scheduled.get(request_id, 0),
                block_ids=single_group(cached.new_block_ids[index]),
                replaces_block_ids=resumed,
            )
        )
    preempted = getattr(scheduler_output, "preempted_req_ids", None) or ()
    return SchedulerStep(requests=requests, preempted_req_ids=sorted(preempted))
