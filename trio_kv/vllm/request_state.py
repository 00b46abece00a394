"""What the scheduler-side connector keeps per request, and how a vLLM request's identity
becomes trio-kv key fields (salt and model namespace). Pure: no I/O."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from ..errors import TrioKVError
from ..keys import pack_tokens, validate_salt
from .metadata import RetrievePlan


class EngineRequest(Protocol):
    """The parts of vLLM's ``Request`` the connector reads."""

    @property
    def request_id(self) -> str: ...

    @property
    def all_token_ids(self) -> Sequence[int]: ...

    @property
    def cache_salt(self) -> str | None: ...


def tenant_salt(cache_salt: str | None) -> str:
    """The trio-kv salt for a vLLM ``cache_salt``.

    A salt trio-kv accepts is used as it is (so per-tenant quotas and status use
    the same name); one it refuses (over 128 characters, or with ``@ / \\`` or NUL)
    becomes ``~`` and a 128-bit digest of it, which keeps tenants apart instead of
    failing every request.
    """
    if not cache_salt:
        return ""
    try:
        return validate_salt(cache_salt)
    except TrioKVError:
        digest = hashlib.blake2b(cache_salt.encode("utf-8", "surrogatepass"), digest_size=16)
        return "~" + digest.hexdigest()


def key_model(model: str, request: Any) -> str | None:
    """The model field of ``request``'s keys, or None when trio-kv cannot name its KV.

    Equal token ids do not always mean equal KV: a LoRA adapter changes it, and
    so do multimodal inputs (their placeholder tokens are the same ids for every
    image). Such requests get ``model#<digest of adapter and inputs>``, so they
    share chunks only with requests that have the same adapter and the same
    inputs at the same positions. Requests with prompt embeddings have no
    token ids to key on: None (not cached).
    """
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    identity: list[tuple[object, ...]] = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        identity.append(("lora", lora.lora_name, getattr(lora, "lora_path", "")))
    for feature in getattr(request, "mm_features", None) or ():
        position = feature.mm_position
        identity.append(("mm", feature.identifier, position.offset, position.length))
    if not identity:
        return model
    return model + "#" + hashlib.blake2b(repr(identity).encode(), digest_size=16).hexdigest()


class PendingLookup:
    """One lookup and whether the request's server session must end as soon as it returns.

    A request that ends while its lookup is in flight must not send EndSession
    first: the lookup would then lease its hits to a session nobody ends.
    """

    __slots__ = ("end_session_after", "future", "lock", "returned", "submitted_at")

    def __init__(self, submitted_at: float) -> None:
        self.lock = threading.Lock()
        self.returned = False
        self.end_session_after = False
        self.submitted_at = submitted_at
        self.future: Future[int] | None = None


class RequestState:
    """What the scheduler side knows about one request."""

    __slots__ = (
        "allocated",
        "block_ids",
        "had_store",
        "hit_tokens",
        "local_tokens",
        "lookup",
        "model",
        "packed",
        "packed_last",
        "pending_retrieve",
        "request",
        "salt",
        "session_open",
        "stored_until",
    )

    def __init__(self, request: EngineRequest, model: str) -> None:
        self.request = request
        self.salt = tenant_salt(request.cache_salt)
        self.model = key_model(model, request)  # None: trio-kv neither loads nor stores it
        self.session_open = False  # a lookup named this request id: EndSession at the end
        self.had_store = False  # a store was planned: request_finished must keep the blocks
        self.packed = b""  # the leading token ids packed so far (packed_tokens)
        self.packed_last = -1
        self.readmit()

    def packed_tokens(self, end: int) -> bytes:
        """``request.all_token_ids[:end]`` in packed form. vLLM only appends to a request's
        token ids, so each id is packed once however many lookups, retrieves and stores
        name it (packing costs ~5 ns a token, ~21 us for a 4096-token prompt, on the
        scheduler's thread). Should the last packed id differ from the request's, the
        ids changed under us and everything is packed again."""
        tokens = self.request.all_token_ids
        have = len(self.packed) // 4
        if have and (have > len(tokens) or tokens[have - 1] != self.packed_last):
            self.packed, have = b"", 0
        if end > have:
            self.packed += pack_tokens(tokens[have:end])
            self.packed_last = tokens[end - 1]
        return self.packed[: 4 * end]

    def readmit(self) -> None:
        """Forget the last admission (a new request, or one preempted since)."""
        self.lookup: PendingLookup | None = None
        self.hit_tokens: int | None = None
        self.local_tokens = 0  # vLLM's own prefix-cache hit, block-aligned
        self.allocated = False
        self.pending_retrieve: RetrievePlan | None = None
        self.block_ids: list[int] = []
        self.stored_until = 0  # tokens whose chunks a planned store covers
