"""The connector's settings, read from vLLM's ``kv_connector_extra_config``. Pure: no I/O.

Every key is spelled ``trio_kv.<field>``; an unknown ``trio_kv.*`` key is an
error, so a typo fails at start-up instead of being ignored. Keys without the
prefix belong to other connectors (e.g. under a MultiConnector) and are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

DEFAULT_URL = "ipc:///tmp/trio-kv.sock"
KEY_PREFIX = "trio_kv."


class ConnectorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings shared by the scheduler-side and the worker-side connector."""

    url: str = DEFAULT_URL  # the trio-kv server (its --listen URL)
    timeout_s: float = 30.0  # a request without a reply after this fails (lookup: no hit)
    connect_timeout_s: float = 30.0  # how long start-up waits for the server to answer
    threads: int = 4  # server requests in flight at once, per connector
    async_load: bool = True  # load between scheduler steps rather than inside one forward pass
    model_name: str = ""  # key namespace for this model's chunks; "" means vLLM's model name
    token: str = ""  # the server's data_token (tcp:// listeners); "" means $TRIO_KV_DATA_TOKEN

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("trio_kv.url must not be empty")
        if self.timeout_s <= 0 or self.connect_timeout_s < 0:
            raise ValueError("trio_kv.timeout_s must be > 0 and trio_kv.connect_timeout_s >= 0")
        if self.threads < 1:
            raise ValueError(f"trio_kv.threads must be >= 1, got {self.threads}")


def config_from_extra(
    extra_config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> ConnectorConfig:
    """Build the settings from ``kv_connector_extra_config``.

    ``trio_kv.url`` defaults to ``$TRIO_KV_URL``, then ``ipc:///tmp/trio-kv.sock``
    (the same default as ``trio-kv serve`` and ``trio-kv ping``); ``trio_kv.token`` to
    ``$TRIO_KV_DATA_TOKEN``.
    """
    environ = os.environ if environ is None else environ
    fields: dict[str, Any] = {}
    if environ.get("TRIO_KV_URL"):
        fields["url"] = environ["TRIO_KV_URL"]
    if environ.get("TRIO_KV_DATA_TOKEN"):
        fields["token"] = environ["TRIO_KV_DATA_TOKEN"]
    known = set(ConnectorConfig.__struct_fields__)
    for key, value in (extra_config or {}).items():
        if not key.startswith(KEY_PREFIX):
            continue
        name = key[len(KEY_PREFIX) :]
        if name not in known:
            raise ValueError(
                f"unknown kv_connector_extra_config key {key!r}; trio-kv knows "
                + ", ".join(sorted(KEY_PREFIX + k for k in known))
            )
        fields[name] = value
    try:
        return msgspec.convert(fields, ConnectorConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad trio-kv connector setting: {exc}") from None
