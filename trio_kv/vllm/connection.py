"""Connecting an engine process to the trio-kv server, and the start-up checks that need it."""

from __future__ import annotations

import math
import time

import pynng

from ..client import BlockingClient
from ..protocol import PROTOCOL_VERSION, Hello, HelloOk
from .config import ConnectorConfig

_REDIAL_INTERVAL_S = 0.25
REDIAL_MAX_MS = 500  # the longest a connector waits to redial a server that went away


def connect(config: ConnectorConfig, *, client_name: str) -> BlockingClient:
    """Dial ``config.url`` and say Hello, retrying for up to ``connect_timeout_s``.

    Sends as well as receives time out after ``timeout_s``: without a send timeout
    an nng request waits forever for a server that has gone away, and the engine's
    background threads would hang with it. While no connection is up (the server
    died; nng redials) calls fail at once, so vLLM recomputes without waiting.
    """
    deadline = time.monotonic() + config.connect_timeout_s
    while True:
        try:
            return _connect_once(config, client_name)
        except (ConnectionError, pynng.NNGException) as exc:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no trio-kv server answered at {config.url} within {config.connect_timeout_s} s "
                    f"({exc}); start it first (`trio-kv serve --listen {config.url}`) or set "
                    "trio_kv.url in kv_connector_extra_config"
                ) from None
        # Start-up only: the engine is not serving yet, so waiting here delays nothing.
        time.sleep(_REDIAL_INTERVAL_S)


def _connect_once(config: ConnectorConfig, client_name: str) -> BlockingClient:
    timeout_ms = max(1, int(config.timeout_s * 1000)) if math.isfinite(config.timeout_s) else -1
    # Redial a server that went away every 50 ms at first, backing off to 0.5 s at most, so a
    # restarted server is found again within half a second.
    sock = pynng.Req0(
        resend_time=-1, recv_max_size=0, reconnect_time_min=50, reconnect_time_max=REDIAL_MAX_MS
    )
    try:
        sock.recv_timeout = timeout_ms
        sock.send_timeout = timeout_ms
        sock.dial(config.url, block=True)
        client = BlockingClient(sock, config.timeout_s, fail_fast=True)
        client._hello_request = Hello(PROTOCOL_VERSION, client_name, config.token)
        client.hello = client.call(client._hello_request, HelloOk)
    except BaseException:
        sock.close()
        raise
    return client


def check_chunk_size(chunk_size: int, block_size: int) -> None:
    """Refuse to start when a trio-kv chunk is not a whole number of vLLM blocks."""
    if block_size < 1 or chunk_size % block_size:
        raise ValueError(
            f"the trio-kv server's chunk size ({chunk_size} tokens) is not a multiple of vLLM's "
            f"block size ({block_size} tokens): restart trio-kv with --chunk-size set to a multiple "
            f"of {block_size}, or run vLLM with a --block-size that divides {chunk_size}"
        )
