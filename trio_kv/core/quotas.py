"""Per-tenant byte quotas, per tier. Pure bookkeeping plus a small JSON state file.

A quota caps the bytes one ``cache_salt`` may hold in one tier ("l1", or an L2
adapter's name such as "fs:/var/cache/trio-kv"). Salts without a quota of their
own fall back to the tier's default (unlimited unless set). Enforcement is at
admission, by the tier itself: a tenant at its quota makes room by evicting its
own least recently used chunks, never another tenant's.

In URLs and on the command line the empty salt is spelled ``@empty`` and the
default ``@default``: '@' can never appear in a real salt.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable

import trio

from ..errors import TrioKVError
from ..keys import validate_salt

EMPTY_SALT_NAME = "@empty"
DEFAULT_NAME = "@default"
L1_TIER = "l1"
MAX_QUOTA_BYTES = 2**63 - 1  # what a signed 64-bit counter (and Prometheus, exactly) can hold

QuotaListener = Callable[[], None]


class QuotaError(ValueError):
    """A quota value or name is invalid."""


def salt_from_url_name(name: str) -> str | None:
    """The salt a URL name means; None for ``@default``."""
    if name == DEFAULT_NAME:
        return None
    if name == EMPTY_SALT_NAME:
        return ""
    return _checked_salt(name)


def _checked_salt(salt: str) -> str:
    try:
        return validate_salt(salt)
    except TrioKVError as exc:
        raise QuotaError(exc.message) from None


def salt_to_url_name(salt: str | None) -> str:
    if salt is None:
        return DEFAULT_NAME
    return EMPTY_SALT_NAME if salt == "" else salt


def parse_quota_bytes(value: object) -> int:
    """A quota in bytes: an integer (or integral float) or a size string, 0..MAX_QUOTA_BYTES."""
    return _in_range(_quota_bytes(value), value)


def _quota_bytes(value: object) -> int:
    from ..sizes import parse_size

    if isinstance(value, bool):
        raise QuotaError(f"not a byte count: {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise QuotaError(f"not a byte count: {value!r}")
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise QuotaError(str(exc)) from None
    raise QuotaError(f"not a byte count: {value!r}")


def _in_range(quota: int, value: object) -> int:
    if quota < 0:
        raise QuotaError(f"a quota cannot be negative: {value!r}")
    if quota > MAX_QUOTA_BYTES:  # the value may have thousands of digits: not echoed
        raise QuotaError(f"a quota must be at most {MAX_QUOTA_BYTES} bytes (2**63 - 1)")
    return quota


class QuotaBook:
    """Quotas by tier and salt, with defaults per tier, optionally persisted to ``path``."""

    def __init__(self, tiers: list[str], path: str | None = None) -> None:
        self.tiers = list(tiers)
        self.path = path
        # salt (None = the default for salts without their own) -> tier -> bytes
        self._quotas: dict[str | None, dict[str, int]] = {}
        self._listeners: list[QuotaListener] = []
        self._version = self._saved_version = 0  # changes made / written to the state file
        self._save_lock = trio.Lock()
        if path is not None and os.path.exists(path):
            self._load(path)

    def add_listener(self, listener: QuotaListener) -> None:
        self._listeners.append(listener)

    def limit(self, tier: str, salt: str) -> int | None:
        """Bytes ``salt`` may hold in ``tier``; None for no limit."""
        own = self._quotas.get(salt)
        if own is not None and tier in own:
            return own[tier]
        default = self._quotas.get(None)
        return default.get(tier) if default is not None else None

    def limiter(self, tier: str) -> Callable[[str], int | None]:
        """A salt -> limit function for one tier (what a tier consults at admission)."""
        return lambda salt: self.limit(tier, salt)

    def get(self, salt: str | None) -> dict[str, int]:
        return dict(self._quotas.get(salt, {}))

    def all(self) -> dict[str | None, dict[str, int]]:
        return {salt: dict(tiers) for salt, tiers in self._quotas.items()}

    def set(self, salt: str | None, limits: dict[str, object]) -> dict[str, int]:
        """Set (merge) quotas for one salt; validates everything before changing anything."""
        if not limits:
            raise QuotaError('give at least one tier, e.g. {"l1": "8GiB"}')
        parsed: dict[str, int] = {}
        for tier, value in limits.items():
            if tier not in self.tiers:
                raise QuotaError(f"unknown tier {tier!r}; tiers: {', '.join(self.tiers)}")
            parsed[tier] = parse_quota_bytes(value)
        if salt is not None:
            _checked_salt(salt)
        self._quotas.setdefault(salt, {}).update(parsed)
        self._changed()
        return self.get(salt)

    def delete(self, salt: str | None, tier: str | None = None) -> bool:
        """Remove a salt's quotas (one tier, or all); True if there was one."""
        own = self._quotas.get(salt)
        if own is None or (tier is not None and tier not in own):
            return False
        if tier is None:
            del self._quotas[salt]
        else:
            del own[tier]
            if not own:
                del self._quotas[salt]
        self._changed()
        return True

    def _changed(self) -> None:
        self._version += 1
        for listener in self._listeners:
            listener()

    @property
    def unsaved(self) -> bool:
        """True while a change has not reached the state file (always False without one)."""
        return self.path is not None and self._saved_version != self._version

    async def save(self) -> None:
        """Write the state file if anything changed since the last write. The write (with fsync)
        runs in a thread so a slow disk never stalls the event loop; concurrent saves queue and
        each writes the newest state. Raises OSError when the file cannot be written."""
        if self.path is None:
            return
        async with self._save_lock:
            if not self.unsaved:
                return
            version, state = self._version, self._state()
            await trio.to_thread.run_sync(_write_state, self.path, state)
            self._saved_version = version

    def save_now(self) -> None:
        """``save`` for code outside the event loop (start-up, tests)."""
        if self.unsaved:
            assert self.path is not None
            version = self._version
            _write_state(self.path, self._state())
            self._saved_version = version

    def _state(self) -> dict[str, object]:
        return {
            "version": 1,
            "quotas": {salt_to_url_name(salt): dict(tiers) for salt, tiers in self._quotas.items()},
        }

    def _load(self, path: str) -> None:
        try:
            with open(path) as handle:
                state = json.load(handle)
            quotas = state["quotas"]
            loaded: dict[str | None, dict[str, int]] = {}
            for name, tiers in quotas.items():
                loaded[salt_from_url_name(name)] = {t: parse_quota_bytes(v) for t, v in tiers.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QuotaError(f"cannot read quota state {path}: {exc}") from None
        self._quotas = loaded


def _write_state(path: str, state: dict[str, object]) -> None:
    """Atomically replace ``path`` with ``state`` as JSON (temp file, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".quotas-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
