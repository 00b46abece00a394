"""Request checks the engine makes before a flow takes anything: key limits and block ranges.

Pure functions of the request, the server's limits and a registration's layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ErrorCode, TrioKVError
from ..keys import RequestKey, effective_end, token_count, validate_request_key
from ..protocol import Limits, RegisterKVCache


def check_id(what: str, value: str, limits: Limits) -> None:
    """Refuse an id (request id, instance id, model name) longer than ``max_id_chars``: each is
    held in leases, sessions or the registry, so its length bounds what one peer can pin."""
    if len(value) > limits.max_id_chars:
        raise TrioKVError(
            ErrorCode.LIMIT_EXCEEDED,
            f"{what} of {len(value)} characters exceeds the limit of {limits.max_id_chars}",
        )


def check_registration(request: RegisterKVCache, limits: Limits, chunk_size: int) -> None:
    """Refuse an instance id that is empty or too long, or a block size that does not divide
    the chunk size."""
    if not request.instance_id or len(request.instance_id) > limits.max_id_chars:
        raise TrioKVError(
            ErrorCode.INVALID_ARGUMENT, f"instance_id must be 1..{limits.max_id_chars} characters"
        )
    if request.block_size < 1 or chunk_size % request.block_size:
        raise TrioKVError(
            ErrorCode.BAD_REGISTRATION,
            f"block_size {request.block_size} must divide the chunk size {chunk_size}",
        )


def check_key(key: RequestKey, limits: Limits, chunk_size: int, *, needs_rank: bool) -> None:
    """Refuse a key over the server's limits (tokens, world size, chunk keys, id lengths) or
    malformed."""
    check_id("model", key.model, limits)
    check_id("request_id", key.request_id, limits)
    if token_count(key) > limits.max_tokens_per_key:
        raise TrioKVError(
            ErrorCode.LIMIT_EXCEEDED,
            f"{token_count(key)} tokens exceed the limit of {limits.max_tokens_per_key} per key",
        )
    if key.world_size > limits.max_world_size:
        raise TrioKVError(
            ErrorCode.LIMIT_EXCEEDED, f"world_size {key.world_size} exceeds {limits.max_world_size}"
        )
    validate_request_key(key, needs_rank=needs_rank)
    ranks = key.world_size if key.rank is None else 1
    n_keys = effective_end(key) // chunk_size * ranks
    if n_keys > limits.max_keys_per_request:
        raise TrioKVError(
            ErrorCode.LIMIT_EXCEEDED,
            f"the request names {n_keys} chunk keys (chunks x ranks); the limit is {limits.max_keys_per_request}",
        )


def check_blocks(block_ids: Sequence[int], num_blocks: int, limits: Limits) -> None:
    """Refuse more block ids than the limit, or one outside the registration's ``num_blocks``."""
    if len(block_ids) > limits.max_block_ids:
        raise TrioKVError(
            ErrorCode.LIMIT_EXCEEDED,
            f"{len(block_ids)} block ids exceed the limit of {limits.max_block_ids}",
        )
    if block_ids and (min(block_ids) < 0 or max(block_ids) >= num_blocks):
        bad = next(b for b in block_ids if not 0 <= b < num_blocks)
        raise TrioKVError(
            ErrorCode.BLOCK_OUT_OF_RANGE,
            f"block id {bad} outside 0..{num_blocks - 1} of this registration",
        )
