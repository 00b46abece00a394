"""The admin server's HTTP plumbing: request and response structs, JSON bodies, the ASGI
send/receive helpers and ``start_admin`` (hypercorn's Trio worker in a nursery of ours).
``admin.py`` holds the routes; this module knows nothing of the engine."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import hypercorn.trio
import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

MAX_BODY_BYTES = 64 * 1024
JSON_TYPE = b"application/json"


class HTTPError(Exception):
    """An error answer: status and message (sent as ``{"error": message}``)."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class HTTPRequest(msgspec.Struct):
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[bytes, bytes]
    body: bytes = b""
    salt_name: str = ""  # the {salt} of /v1/quota/{salt}
    raw_path: str = ""  # the path as sent, still percent-encoded (so a salt's %2F stays one)


class HTTPResponse(msgspec.Struct):
    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()


Handler = Callable[[HTTPRequest], Awaitable[HTTPResponse]]


def json_response(value: Any, status: int = 200) -> HTTPResponse:
    return HTTPResponse(status, msgspec.json.encode(value))


def plain(value: Any) -> Any:
    """Structs as dicts of their fields, recursively (``msgspec.to_builtins`` would turn the
    wire's ``array_like`` structs into bare lists)."""
    if isinstance(value, msgspec.Struct):
        return {name: plain(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def json_body(request: HTTPRequest, *, required: bool) -> Any:
    if not request.body.strip():
        if required:
            raise HTTPError(400, "a JSON body is required")
        return {}
    try:
        # The stdlib parser reads NaN and Infinity, so they reach the quota validation (and its message).
        return json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"the body is not JSON: {exc}") from None


async def read_body(receive: ASGIReceiveCallable) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] != "http.request":
            raise HTTPError(400, "the client went away before sending its body")
        size += len(event["body"])
        if size > MAX_BODY_BYTES:
            raise HTTPError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(event["body"])
        if not event["more_body"]:
            return b"".join(chunks)


async def send_response(send: ASGISendCallable, response: HTTPResponse) -> None:
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
        (b"cache-control", b"no-store"),
        *response.headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


async def lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def start_admin(
    nursery: trio.Nursery,
    app: ASGIFramework,
    address: tuple[str, int],
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
) -> str:
    """Serve ``app`` on ``address`` in ``nursery``; return the URL actually bound (port 0 works).

    A bind failure is raised as a plain OSError naming the address (hypercorn raises it from
    inside two nurseries). Once ``shutdown_trigger`` returns, hypercorn stops accepting and
    finishes open requests; cancelling ``nursery`` stops it at once.
    """
    host, port = address
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.errorlog = logging.getLogger("trio_kv.server.admin.http")
    config.accesslog = None
    config.include_server_header = False
    config.graceful_timeout = 1.0
    try:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, app, config, shutdown_trigger=shutdown_trigger, mode="asgi")
        )
    except BaseExceptionGroup as group:
        bind_errors, others = group.split(OSError)
        if bind_errors is None or others is not None:
            raise
        first = _first_leaf(bind_errors)
        raise OSError(first.errno, f"admin HTTP cannot listen on {host}:{port}: {first.strerror}") from group
    return str(binds[0])


def _first_leaf(group: BaseExceptionGroup[OSError]) -> OSError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, OSError)
    return leaf
