"""Admin HTTP: health, status, Prometheus metrics, clear and quotas, as a small ASGI app
served by hypercorn's Trio worker inside the server's root nursery.

The HTTP layer is thin: parse the request, call the engine, the quota book or the metrics,
answer JSON. Handlers run on the Trio thread like everything else, so they read engine state
directly. Every error is ``{"error": "..."}``: 400 bad body or value, 401 missing or wrong
token (mutating endpoints, when a token is configured), 404 unknown path or salt without a
quota, 405 wrong method, 413 body too large, 504 a clear that ran past the request timeout.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import hypercorn.trio
import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from ..core.engine import CacheEngine
from ..core.l2_tier import L2Tier
from ..core.quotas import L1_TIER, QuotaBook, QuotaError, salt_from_url_name, salt_to_url_name
from ..errors import TrioKVError
from ..keys import validate_salt
from ..protocol import Clear
from .config import ServerConfig
from .metrics import ServerMetrics

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
QUOTA_PREFIX = "/v1/quota/"
MUTATING = frozenset({"POST", "PUT", "DELETE"})
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


class AdminApp:
    """The ASGI app. ``is_draining`` tells health checks the server is shutting down."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        engine: CacheEngine,
        quotas: QuotaBook,
        metrics: ServerMetrics,
        is_draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config = config
        self.engine = engine
        self.quotas = quotas
        self.metrics = metrics
        self.is_draining = is_draining
        self._token = config.admin_token.encode()
        self._routes: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self._healthz},
            "/v1/status": {"GET": self._status},
            "/metrics": {"GET": self._metrics},
            "/v1/clear": {"POST": self._clear},
            "/v1/quota": {"GET": self._quota_list},
        }
        self._quota_routes: dict[str, Handler] = {
            "GET": self._quota_get,
            "PUT": self._quota_put,
            "DELETE": self._quota_delete,
        }

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            response = await self._respond(scope, receive)
            await _send(send, response)
        # websockets: not served; returning closes the connection

    async def _respond(self, scope: HTTPScope, receive: ASGIReceiveCallable) -> HTTPResponse:
        try:
            request = HTTPRequest(
                method=scope["method"].upper(),
                path=scope["path"],
                query=parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True),
                headers={name.lower(): value for name, value in scope["headers"]},
            )
            handler = self._route(request)
            if request.method in MUTATING:
                self._authorize(request)
                request.body = await _read_body(receive)
            return await handler(request)
        except HTTPError as exc:
            return HTTPResponse(exc.status, msgspec.json.encode({"error": exc.message}), headers=exc.headers)
        except Exception as exc:
            log.exception("admin: %s %s failed", scope["method"], scope["path"])
            return json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    def _route(self, request: HTTPRequest) -> Handler:
        methods = self._routes.get(request.path)
        if methods is None and request.path.startswith(QUOTA_PREFIX):
            name = request.path[len(QUOTA_PREFIX) :]
            if name and "/" not in name:
                request.salt_name = name
                methods = self._quota_routes
        if methods is None:
            raise HTTPError(404, f"no such endpoint: {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            raise HTTPError(
                405,
                f"{request.method} not allowed on {request.path}; use {allowed}",
                ((b"allow", allowed.encode()),),
            )
        return handler

    def _authorize(self, request: HTTPRequest) -> None:
        if not self._token:
            return
        scheme, _, token = request.headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._token):
            raise HTTPError(
                401,
                "this endpoint needs the admin token: Authorization: Bearer <token>",
                ((b"www-authenticate", b'Bearer realm="trio-kv"'),),
            )

    # ------------------------------------------------------------ read-only

    async def _healthz(self, request: HTTPRequest) -> HTTPResponse:
        reasons = []
        if self.is_draining():
            reasons.append("shutting down")
        for l2 in _l2_tiers(self.engine):
            health = l2.health()
            if not health.healthy:
                reasons.append(f"{l2.name}: {health.state}" + (f": {health.reason}" if health.reason else ""))
        if reasons:
            return json_response({"status": "unhealthy", "reasons": reasons}, 503)
        return json_response({"status": "ok"})

    async def _status(self, request: HTTPRequest) -> HTTPResponse:
        status = plain(self.engine.status())
        body = {
            "version": status.pop("server_version"),
            **status,
            "l1_evictions": dict(self.engine.l1.evictions_by_reason),
            "draining": self.is_draining(),
            "event_loop_lag_s": self.metrics.loop_lag_last_s,
            "traffic": self.metrics.traffic_summary(),
            "quotas": self._all_quotas(),
            "config": self._config_summary(),
        }
        return json_response(body)

    async def _metrics(self, request: HTTPRequest) -> HTTPResponse:
        accept = request.headers.get(b"accept", b"").decode("latin-1")
        payload, content_type = self.metrics.exposition(accept)
        return HTTPResponse(200, payload, content_type.encode())

    def _config_summary(self) -> dict[str, Any]:
        config = self.config
        return {
            "listen": list(config.listen),
            "l1_size": config.l1_size,
            "chunk_size": config.chunk_size,
            "l2": list(config.l2),
            "eviction_policy": config.eviction_policy,
            "evict_high_watermark": config.evict_high_watermark,
            "evict_low_watermark": config.evict_low_watermark,
            "transfer": config.transfer,
            "workers": config.workers,
            "copy_threads": config.copy_threads,
            "request_timeout_s": config.request_timeout_s,
            "lease_ttl_s": config.lease_ttl_s,
            "session_ttl_s": config.session_ttl_s,
            "admin": config.admin,
            "admin_token_set": bool(config.admin_token),  # never the token itself
            "quota_file": self.quotas.path,
        }

    # ------------------------------------------------------------ clear

    async def _clear(self, request: HTTPRequest) -> HTTPResponse:
        body = _json_body(request, required=False)
        if not isinstance(body, dict):
            raise HTTPError(
                400, 'the body must be a JSON object like {"cache_salt": "t1", "include_l2": true}'
            )
        unknown = set(body) - {"cache_salt", "include_l2"}
        if unknown:
            raise HTTPError(400, f"unknown fields {sorted(unknown)}; known: cache_salt, include_l2")
        salt = body.get("cache_salt")
        include_l2 = body.get("include_l2", False)
        if salt is not None and not isinstance(salt, str):
            raise HTTPError(400, "cache_salt must be a string or null")
        if not isinstance(include_l2, bool):
            raise HTTPError(400, "include_l2 must be true or false")
        if salt is not None:
            try:
                validate_salt(salt)
            except TrioKVError as exc:
                raise HTTPError(400, exc.message) from None
        try:
            with trio.fail_after(self.config.request_timeout_s):
                cleared = await self.engine.clear(Clear(cache_salt=salt, include_l2=include_l2))
        except trio.TooSlowError:
            raise HTTPError(504, f"clear did not finish within {self.config.request_timeout_s} s") from None
        return json_response(plain(cleared))

    # ------------------------------------------------------------ quotas

    def _all_quotas(self) -> dict[str, dict[str, int]]:
        return {salt_to_url_name(salt): tiers for salt, tiers in self.quotas.all().items()}

    def _salt(self, request: HTTPRequest) -> str | None:
        try:
            return salt_from_url_name(request.salt_name)
        except QuotaError as exc:
            raise HTTPError(400, f"bad salt {request.salt_name!r}: {exc}") from None

    def _usage(self, salt: str) -> dict[str, int]:
        usage = {L1_TIER: self.engine.l1.ledger.salt_bytes(salt)}
        for l2 in _l2_tiers(self.engine):
            usage[l2.name] = l2.ledger.salt_bytes(salt)
        return usage

    async def _quota_list(self, request: HTTPRequest) -> HTTPResponse:
        return json_response({"tiers": self.quotas.tiers, "quotas": self._all_quotas()})

    async def _quota_get(self, request: HTTPRequest) -> HTTPResponse:
        salt = self._salt(request)
        quota = self.quotas.get(salt)
        if not quota:
            raise HTTPError(404, f"no quota set for {request.salt_name}")
        return json_response(
            {
                "salt": request.salt_name,
                "quota": quota,
                "usage": None if salt is None else self._usage(salt),
            }
        )

    async def _quota_put(self, request: HTTPRequest) -> HTTPResponse:
        salt = self._salt(request)
        body = _json_body(request, required=True)
        if not isinstance(body, dict):
            raise HTTPError(400, 'the body must be a JSON object of tier -> bytes, e.g. {"l1": "8GiB"}')
        try:
            quota = self.quotas.set(salt, body)
        except QuotaError as exc:
            raise HTTPError(400, str(exc)) from None
        await self._persist_quotas()
        return json_response({"salt": request.salt_name, "quota": quota})

    async def _persist_quotas(self) -> None:
        try:
            await self.quotas.save()
        except OSError as exc:
            log.error("quota state file not written: %s", exc)
            raise HTTPError(
                500, f"the quota is in force but could not be saved to {self.quotas.path}: {exc}"
            ) from None

    async def _quota_delete(self, request: HTTPRequest) -> HTTPResponse:
        salt = self._salt(request)
        tier = None
        for name, value in request.query:
            if name != "tier":
                raise HTTPError(400, f"unknown query parameter {name!r}; only tier is known")
            tier = value
        if tier is not None and tier not in self.quotas.tiers:
            raise HTTPError(400, f"unknown tier {tier!r}; tiers: {', '.join(self.quotas.tiers)}")
        if not self.quotas.delete(salt, tier):
            what = f"tier {tier} of {request.salt_name}" if tier is not None else request.salt_name
            raise HTTPError(404, f"no quota set for {what}")
        await self._persist_quotas()
        return json_response(
            {"salt": request.salt_name, "deleted": tier or "all", "quota": self.quotas.get(salt)}
        )


def _l2_tiers(engine: CacheEngine) -> list[L2Tier]:
    return engine.tiering.l2_tiers if engine.tiering is not None else []


def _json_body(request: HTTPRequest, *, required: bool) -> Any:
    if not request.body.strip():
        if required:
            raise HTTPError(400, "a JSON body is required")
        return {}
    try:
        # The stdlib parser reads NaN and Infinity, so they reach the quota validation (and its message).
        return json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"the body is not JSON: {exc}") from None


async def _read_body(receive: ASGIReceiveCallable) -> bytes:
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


async def _send(send: ASGISendCallable, response: HTTPResponse) -> None:
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
        (b"cache-control", b"no-store"),
        *response.headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


async def _lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def start_admin(
    nursery: trio.Nursery,
    app: AdminApp,
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
