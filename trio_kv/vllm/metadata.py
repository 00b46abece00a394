"""What the scheduler-side connector tells the workers each step, and what it learns from vLLM.

Pure msgspec structs: ``StepPlan`` travels from the scheduler process to every
worker inside vLLM's connector metadata (pickled), ``SchedulerStep`` is the part
of vLLM's ``SchedulerOutput`` the scheduler-side logic needs, in a form that
does not depend on vLLM's classes.
"""

from __future__ import annotations

import msgspec


class RetrievePlan(msgspec.Struct, frozen=True):
    """Load a request's cached chunks into its blocks.

    ``tokens`` are the packed token ids of ``[0, end)`` (whole chunks); ``block_ids``
    is the request's block table over the same tokens. Tokens before
    ``skip_tokens`` are blocks vLLM already holds (its own prefix cache) and are
    never written. ``is_async``: the request waits outside the batch until
    ``get_finished`` reports the load (else the load finishes before the forward pass).
    """

    request_id: str
    model: str  # the keys' model field (``request_state.key_model``)
    cache_salt: str
    tokens: bytes
    block_ids: list[int]
    skip_tokens: int
    is_async: bool


class StorePlan(msgspec.Struct, frozen=True):
    """Store the whole chunks of ``[start, end)`` of a request after this step's forward pass.

    ``tokens`` are the packed ids of ``[0, end)`` (a chunk's key names its whole
    prefix) and ``block_ids`` the block table over them.
    """

    request_id: str
    model: str
    cache_salt: str
    tokens: bytes
    block_ids: list[int]
    start: int


class StepPlan(msgspec.Struct, frozen=True):
    """Everything the workers do for trio-kv in one engine step."""

    retrieves: list[RetrievePlan] = []
    stores: list[StorePlan] = []
    preempted_req_ids: list[str] = []  # their blocks are freed: pending stores must finish first


class ScheduledRequest(msgspec.Struct, frozen=True):
    """One request in this step's batch, as vLLM's SchedulerOutput describes it.

    ``block_ids`` are the blocks allocated since the last step, or the whole block
    table when ``replaces_block_ids`` (a new or resumed request).
    """

    request_id: str
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: list[int] | None = None
    replaces_block_ids: bool = False


class SchedulerStep(msgspec.Struct, frozen=True):
    requests: list[ScheduledRequest] = []
    preempted_req_ids: list[str] = []
