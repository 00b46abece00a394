"""An embedded test harness: a full trio-kv server in-process, on a temporary socket.

async with running_server(l1_size="64MiB") as server:
    async with await AsyncClient.connect(server.url) as client:
        ...
    assert_no_leaks(server)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .core.engine import FaultHook
from .export.shm import SharedKVCache, create_shared_kv_cache
from .server.config import load_config
from .server.process import Server

__all__ = [
    "AdminResponse",
    "FaultInjector",
    "InjectedFault",
    "RunningServer",
    "admin_request",
    "assert_no_leaks",
    "make_kv_cache",
    "running_server",
]


class RunningServer:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.engine = server.engine
        self.url = server.urls[0]
        self.urls = server.urls
        self.admin_url = server.admin_url  # None with no_admin=True


@asynccontextmanager
async def running_server(*, faults: FaultHook | None = None, **settings: Any) -> AsyncIterator[RunningServer]:
    """Start a server on ``ipc://<tempdir>/trio-kv.sock`` and stop it on exit.

    ``settings`` are ServerConfig fields (sizes may be strings like "64MiB");
    the environment is ignored so tests are hermetic. L1 defaults to 64 MiB; the admin HTTP
    server listens on a free loopback port (``server.admin_url``).
    """
    socket_dir = tempfile.mkdtemp(prefix="trio-kv-test-")
    settings.setdefault("listen", [f"ipc://{socket_dir}/trio-kv.sock"])
    settings.setdefault("l1_size", "64MiB")
    settings.setdefault("admin", "127.0.0.1:0")
    config = load_config(environ={}, overrides=settings)
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(Server(config, faults=faults).serve)
            try:
                yield RunningServer(server)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


class AdminResponse:
    """One admin HTTP answer: status, headers (lower-case names) and body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"AdminResponse({self.status}, {self.body[:200]!r})"


async def admin_request(
    server: RunningServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    raw_body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> AdminResponse:
    """One real HTTP request to the server's admin API. urllib runs in a worker thread, so the
    server keeps serving on this Trio loop; error statuses are returned, not raised. ``body``
    is sent as JSON, ``raw_body`` as is."""
    if server.admin_url is None:
        raise RuntimeError("this server runs without the admin API (no_admin)")
    data = raw_body if raw_body is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.admin_url + path, data=data, method=method)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")

    def send() -> AdminResponse:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return AdminResponse(
                    response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
                )
        except urllib.error.HTTPError as exc:
            return AdminResponse(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())

    return await trio.to_thread.run_sync(send)


def make_kv_cache(**kwargs: Any) -> SharedKVCache:
    """A shared-memory KV cache with small defaults (see ``create_shared_kv_cache``)."""
    kwargs.setdefault("num_blocks", 64)
    return create_shared_kv_cache(**kwargs)


def assert_no_leaks(server: RunningServer | Server, *, leases_allowed: bool = False) -> None:
    """Assert the ledgers match a recount, nothing is half-written or being read,
    and (unless allowed) no lease is held."""
    engine = server.engine
    problems = engine.audit()
    if not leases_allowed and len(engine.leases):
        problems.append(f"{len(engine.leases)} leases still held")
    if engine.requests_in_flight:
        problems.append(f"{engine.requests_in_flight} requests still in flight")
    assert not problems, "leaks found:\n  " + "\n  ".join(problems)


class InjectedFault(Exception):
    """Raised by a FaultInjector at its chosen point."""


class FaultInjector:
    """A fault hook for the engine: records every point reached and, at ``point``,
    either raises ``InjectedFault`` (mode "raise") or waits until ``release`` is
    set (mode "hang"), so a test can cancel or time out the request right there.
    """

    def __init__(self, point: str | None = None, mode: str = "raise") -> None:
        if mode not in ("raise", "hang"):
            raise ValueError(f"mode must be 'raise' or 'hang', got {mode!r}")
        self.point = point
        self.mode = mode
        self.seen: list[str] = []
        self.fired = 0
        self.reached = trio.Event()
        self.release = trio.Event()

    async def __call__(self, name: str) -> None:
        self.seen.append(name)
        if name != self.point:
            return
        self.fired += 1
        self.reached.set()
        if self.mode == "raise":
            raise InjectedFault(f"injected at {name}")
        await self.release.wait()


def shm_files() -> set[str]:
    """Names of trio-kv shared-memory files now in /dev/shm (for leak checks in tests)."""
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith("trio-kv-")}
    except FileNotFoundError:
        return set()
