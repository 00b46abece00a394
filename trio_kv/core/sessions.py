"""Per-request hash sessions: running prefix hashes kept so repeated calls hash only new tokens."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..keys import HASH_BYTES, ROOT_HASH, RequestKey, chain_hashes, packed_prefix

# What one session costs besides its tokens, hashes and ids: the session object, its dict slot,
# the key tuple and the list (CPython 3.11, measured with tracemalloc, rounded up).
SESSION_OVERHEAD_BYTES = 400
HASH_ENTRY_BYTES = HASH_BYTES + 41  # a bytes object of HASH_BYTES and its list slot


class _Session:
    __slots__ = ("deadline", "hashes", "nbytes", "packed")

    def __init__(self, packed: bytes, hashes: list[bytes], deadline: float) -> None:
        self.packed = packed
        self.hashes = hashes
        self.deadline = deadline
        self.nbytes = 0


def _session_bytes(session_key: tuple[str, str], session: _Session) -> int:
    salt, request_id = session_key
    return (
        SESSION_OVERHEAD_BYTES
        + len(salt)
        + len(request_id)
        + len(session.packed)
        + HASH_ENTRY_BYTES * len(session.hashes)
    )


class HashSessions:
    """Per-request caches of running prefix hashes, so repeated calls hash only new tokens.

    A session is keyed by (cache_salt, request_id) and expires ``ttl`` seconds
    after its last use; at most ``max_sessions`` are kept, holding at most ``max_bytes``
    together (tokens, hashes, ids and overhead; least recent dropped first).
    """

    def __init__(
        self,
        chunk_size: int,
        ttl: float,
        max_sessions: int,
        clock: Callable[[], float],
        *,
        max_bytes: int = 256 * 1024**2,
    ) -> None:
        self.chunk_size = chunk_size
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.nbytes = 0  # what the kept sessions hold, as _session_bytes counts it
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
        session = self._sessions.get(session_key)
        if session is not None and session.packed.startswith(packed):
            # Nothing new to hash (a repeated lookup, or a shorter prefix): the session only
            # becomes the most recent, its size unchanged.
            session.deadline = now + self.ttl
            self._sessions.move_to_end(session_key)
            return session.hashes[:n_full]
        session = self._pop(session_key)
        if session is None or not packed.startswith(session.packed):
            # New request, or its tokens changed: start over.
            session = _Session(b"", [], now)
        # Here ``packed`` extends what the session hashed: only its new chunks are hashed.
        known = len(session.hashes)
        prev = session.hashes[-1] if known else ROOT_HASH
        new = chain_hashes(packed, self.chunk_size, prev, first=known)
        self.chunks_hashed += len(new)
        session.hashes = session.hashes + new
        session.packed = packed
        session.deadline = now + self.ttl
        session.nbytes = _session_bytes(session_key, session)
        self._sessions[session_key] = session
        self.nbytes += session.nbytes
        while self._sessions and (len(self._sessions) > self.max_sessions or self.nbytes > self.max_bytes):
            self._pop_oldest()
        return session.hashes[:n_full]

    def end(self, cache_salt: str, request_id: str) -> bool:
        """Forget a request's session; True if there was one."""
        return self._pop((cache_salt, request_id)) is not None

    def clear(self) -> None:
        self._sessions.clear()
        self.nbytes = 0

    def _pop(self, session_key: tuple[str, str]) -> _Session | None:
        session = self._sessions.pop(session_key, None)
        if session is not None:
            self.nbytes -= session.nbytes
        return session

    def _pop_oldest(self) -> None:
        _, session = self._sessions.popitem(last=False)
        self.nbytes -= session.nbytes

    def _expire(self, now: float) -> None:
        # Sessions are kept in last-use order, so expired ones are at the front.
        while self._sessions:
            first = next(iter(self._sessions.values()))
            if first.deadline > now:
                break
            self._pop_oldest()
