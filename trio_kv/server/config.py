"""Server configuration: one msgspec struct; defaults < TOML file < TRIO_KV_* environment < flags."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import msgspec

from ..adapters.spec import AdapterSpec, parse_spec
from ..nt_stores import DEFAULT_THRESHOLD, MIN_THRESHOLD
from ..sizes import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_LISTEN = "ipc:///tmp/trio-kv.sock"
ENV_PREFIX = "TRIO_KV_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_SIZE_FIELDS = ("l1_size", "max_message_bytes", "max_session_bytes", "copy_nt_threshold")
_LIST_FIELDS = ("listen", "l2")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: list[str] = msgspec.field(default_factory=lambda: [DEFAULT_LISTEN])
    l1_size: int = 2 * 1024**3
    chunk_size: int = 256
    log_level: str = "info"
    request_timeout_s: float = 30.0
    lease_ttl_s: float = 60.0
    session_ttl_s: float = 600.0
    max_sessions: int = 65536
    max_session_bytes: int = 256 * 1024**2
    inflight_wait_s: float = 2.0
    max_message_bytes: int = 16 * 1024**2
    max_tokens_per_key: int = 1 << 20
    max_block_ids: int = 1 << 20
    max_world_size: int = 1024
    max_keys_per_request: int = 1 << 18
    max_id_chars: int = 256
    workers: int = 64
    nng_task_threads: int = 2
    loop_slice_us: int = 100
    copy_threads: int = 2
    copy_nt_threshold: int = DEFAULT_THRESHOLD
    evict_high_watermark: float = 0.95
    evict_low_watermark: float = 0.90
    shm_dir: str = "/dev/shm"
    socket_mode: str = "0600"
    transfer: str = "auto"
    gpu_copy_timeout_s: float = 30.0
    l2: list[str] = msgspec.field(default_factory=list)
    l2_queue_size: int = 1024
    l2_writers: int = 2
    l2_lookup_timeout_s: float = 0.5
    l2_load_timeout_s: float = 10.0
    l2_load_concurrency: int = 8
    l2_write_timeout_s: float = 30.0
    l2_max_inflight_writes: int = 16
    eviction_policy: str = "isolated"
    quota_file: str = ""
    admin: str = "127.0.0.1:8470"
    no_admin: bool = False
    admin_token: str = ""
    data_token: str = ""
    allow_unauthenticated_tcp: bool = False
    loop_lag_probe_s: float = 0.25

    def validate(self) -> ServerConfig:
        """Return self if every value is usable, else raise ConfigError naming the field."""
        if not self.listen:
            raise ConfigError("listen: at least one URL is needed")
        for url in self.listen:
            if not url.startswith(("ipc://", "tcp://")):
                raise ConfigError(f"listen: {url!r} must start with ipc:// or tcp://")
            if url.startswith("tcp://") and not self.data_token and not self.allow_unauthenticated_tcp:
                raise ConfigError(
                    f"listen: {url} would let anyone who can reach it read, write and clear the cache: "
                    "set data_token (TRIO_KV_DATA_TOKEN; clients say it in Hello), or "
                    "allow_unauthenticated_tcp = true on a network you trust"
                )
        positive = {
            "l1_size": self.l1_size,
            "chunk_size": self.chunk_size,
            "request_timeout_s": self.request_timeout_s,
            "lease_ttl_s": self.lease_ttl_s,
            "session_ttl_s": self.session_ttl_s,
            "max_sessions": self.max_sessions,
            "max_session_bytes": self.max_session_bytes,
            "max_message_bytes": self.max_message_bytes,
            "max_tokens_per_key": self.max_tokens_per_key,
            "max_block_ids": self.max_block_ids,
            "max_world_size": self.max_world_size,
            "max_keys_per_request": self.max_keys_per_request,
            "max_id_chars": self.max_id_chars,
            "workers": self.workers,
            "copy_threads": self.copy_threads,
            "gpu_copy_timeout_s": self.gpu_copy_timeout_s,
            "l2_queue_size": self.l2_queue_size,
            "l2_writers": self.l2_writers,
            "l2_lookup_timeout_s": self.l2_lookup_timeout_s,
            "l2_load_timeout_s": self.l2_load_timeout_s,
            "l2_load_concurrency": self.l2_load_concurrency,
            "l2_write_timeout_s": self.l2_write_timeout_s,
            "l2_max_inflight_writes": self.l2_max_inflight_writes,
            "loop_lag_probe_s": self.loop_lag_probe_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{name}: must be > 0, got {value}")
        if not (self.loop_slice_us == 0 or 100 <= self.loop_slice_us <= 100_000):
            raise ConfigError(
                f"loop_slice_us: 0 (the kernel's default) or 100..100000, got {self.loop_slice_us}"
            )
        if not (self.copy_nt_threshold == 0 or self.copy_nt_threshold >= MIN_THRESHOLD):
            raise ConfigError(
                f"copy_nt_threshold: 0 (glibc's default) or at least {MIN_THRESHOLD} bytes, "
                f"got {self.copy_nt_threshold}"
            )
        if self.nng_task_threads < 2:
            raise ConfigError(f"nng_task_threads: nng runs at least 2, got {self.nng_task_threads}")
        if not self.inflight_wait_s >= 0:
            raise ConfigError(f"inflight_wait_s: must be >= 0, got {self.inflight_wait_s}")
        if not 0 < self.evict_low_watermark <= self.evict_high_watermark <= 1:
            raise ConfigError("evict_low_watermark <= evict_high_watermark must both be in (0, 1]")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.transfer not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"transfer: {self.transfer!r} is not one of auto, cpu, cuda")
        for spec in self.l2_specs():
            if spec.kind == "fs" and not spec.options.get("create") and not os.path.isdir(spec.location):
                raise ConfigError(
                    f"l2: {spec.text!r}: the directory {spec.location} does not exist; create it first "
                    "or add ?create=true"
                )
        self.socket_permissions()
        if self.eviction_policy not in ("lru", "isolated"):
            raise ConfigError(f"eviction_policy: {self.eviction_policy!r} is not one of lru, isolated")
        self.admin_address()
        return self

    def socket_permissions(self) -> int:
        """``socket_mode`` as an int: owner read/write always, group optional, never others."""
        try:
            mode = int(self.socket_mode, 8)
        except ValueError:
            raise ConfigError(
                f"socket_mode: {self.socket_mode!r} is not an octal mode like 0600 or 0660"
            ) from None
        if mode & 0o600 != 0o600 or mode & ~0o660:
            raise ConfigError(
                f"socket_mode: {self.socket_mode} must give the owner read/write and nothing to others "
                "(0600, 0620, 0640 or 0660)"
            )
        return mode

    def admin_address(self) -> tuple[str, int]:
        """``admin`` as (host, port); ConfigError if it is not HOST:PORT."""
        host, sep, port = self.admin.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"admin: {self.admin!r} is not HOST:PORT (e.g. 127.0.0.1:8470)")
        return host.strip("[]"), int(port)

    def quota_path(self, config_path: str | None = None) -> str | None:
        """Where quotas persist: ``quota_file``, else beside the first fs tier, else beside
        the config file, else nowhere (quotas then last until the server stops)."""
        if self.quota_file:
            return self.quota_file
        for spec in self.l2_specs():
            if spec.kind == "fs":
                return os.path.join(spec.location, "trio-kv-quotas.json")
        if config_path:
            return os.path.join(os.path.dirname(os.path.abspath(config_path)), "trio-kv-quotas.json")
        return None

    def l2_specs(self) -> list[AdapterSpec]:
        """The parsed ``l2`` entries, in lookup priority order; ConfigError if one is bad."""
        specs = []
        for text in self.l2:
            try:
                specs.append(parse_spec(text))
            except ValueError as exc:
                raise ConfigError(f"l2: {exc}") from None
        return specs


FIELDS = ServerConfig.__struct_fields__


def _normalise(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in raw.items():
        field = name.replace("-", "_")
        if field not in FIELDS:
            raise ConfigError(f"{source}: unknown setting {name!r}; known: {', '.join(FIELDS)}")
        if field in _SIZE_FIELDS:
            try:
                value = parse_size(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: {field}: {exc}") from None
        if field in _LIST_FIELDS and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        out[field] = value
    return out


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from TRIO_KV_<FIELD> variables (TRIO_KV_CONFIG names the file and is not a field)."""
    raw = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG"
    }
    return _normalise(raw, "environment")


def from_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return _normalise(raw, path)


def load_config(
    *,
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Merge defaults < TOML file (``path`` or $TRIO_KV_CONFIG) < environment < overrides."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        merged.update(from_toml(path))
    merged.update(from_env(environ))
    merged.update(_normalise({k: v for k, v in (overrides or {}).items() if v is not None}, "flags"))
    try:
        config = msgspec.convert(merged, ServerConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    return config.validate()


def config_json(config: ServerConfig) -> str:
    return msgspec.json.format(msgspec.json.encode(config), indent=2).decode()
