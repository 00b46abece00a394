"""Per-request hash sessions: running prefix hashes kept so repeated calls hash only new tokens."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..keys import ROOT_HASH, RequestKey, chain_hashes, packed_prefix


class _Session:
    __slots__ = ("deadline", "hashes", "packed")

    def __init__(self, packed: bytes, hashes: list[bytes], deadline: float) -> None:
        self.packed = packed
        self.hashes = hashes
        self.deadline = deadline


class HashSessions:
    """Per-request caches of running prefix hashes, so repeated calls hash only new tokens.

    A session is keyed by (cache_salt, request_id) and expires ``ttl`` seconds
    after its last use; at most ``max_sessions`` are kept (least recent dropped).
    """

    def __init__(self, chunk_size: int, ttl: float, max_sessions: int, clock: Callable[[], float]) -> None:
        self.chunk_size = chunk_size
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()
        self.chunks_hashed = 0  # total chunk hashes computed: lets tests see the cache work

    def __len__(self) -> int:
        return len(self._sessions)

    def hashes(self, key: RequestKey, end: int) -> list[bytes]:
        """Prefix hashes of the full chunks of ``key.tokens[:end]``."""
        n_full = end // self.chunk_size
        packed = packed_prefix(key, n_full * self.chunk_size)
        now = self._clock()
        self._expire(now)
        if not key.request_id:
            self.chunks_hashed += n_full
            return chain_hashes(packed, self.chunk_size)
        session_key = (key.cache_salt, key.request_id)
        session = self._sessions.pop(session_key, None)
        if session is None or not (packed.startswith(session.packed) or session.packed.startswith(packed)):
            # New request, or its tokens changed: start over.
            session = _Session(b"", [], now)
        if len(packed) > len(session.packed):
            known = len(session.hashes)
            prev = session.hashes[-1] if known else ROOT_HASH
            new = chain_hashes(packed, self.chunk_size, prev, first=known)
            self.chunks_hashed += len(new)
            session.hashes = session.hashes + new
            session.packed = packed
        session.deadline = now + self.ttl
        self._sessions[session_key] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session.hashes[:n_full]

    def end(self, cache_salt: str, request_id: str) -> bool:
        """Forget a request's session; True if there was one."""
        return self._sessions.pop((cache_salt, request_id), None) is not None

    def clear(self) -> None:
        self._sessions.clear()

    def _expire(self, now: float) -> None:
        # Sessions are kept in last-use order, so expired ones are at the front.
        while self._sessions:
            first = next(iter(self._sessions.values()))
            if first.deadline > now:
                break
            self._sessions.popitem(last=False)
