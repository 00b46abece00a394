"""Admin HTTP: health, status, Prometheus metrics, clear and quotas, as a small ASGI app
served by hypercorn's Trio worker inside the server's root nursery.

The HTTP layer is thin: parse the request, call the engine, the quota book or the metrics,
answer JSON. Handlers run on the Trio thread like everything else; what they show of the
engine comes from its one status snapshot (``core/status.py``). Plumbing is in ``http.py``. Every error is ``{"error": "..."}``: 400 bad body or value, 401 missing or wrong
token (mutating endpoints, when a token is configured), 404 unknown path or salt without a
quota, 405 wrong method, 413 body too large, 504 a clear that ran past the request timeout.
"""

from __future__ import annotations

import hmac
import logging
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote

import msgspec
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from ..core.engine import CacheEngine
from ..core.quotas import L1_TIER, QuotaBook, QuotaError, salt_from_url_name, salt_to_url_name
from ..errors import TrioKVError
from ..keys import validate_salt
from ..protocol import Clear
from .config import ServerConfig
from .http import (
    Handler,
    HTTPError,
    HTTPRequest,
    HTTPResponse,
    json_body,
    json_response,
    lifespan,
    plain,
    read_body,
    send_response,
)
from .metrics import ServerMetrics

if sys.version_info < (3, 11):  # pragma: no cover
    pass

log = logging.getLogger(__name__)

QUOTA_PREFIX = "/v1/quota/"
MUTATING = frozenset({"POST", "PUT", "DELETE"})


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
            "/readyz": {"GET": self._readyz},
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
            await lifespan(receive, send)
        elif scope["type"] == "http":
            response = await self._respond(scope, receive)
            await send_response(send, response)
        # websockets: not served; returning closes the connection

    async def _respond(self, scope: HTTPScope, receive: ASGIReceiveCallable) -> HTTPResponse:
        try:
            request = HTTPRequest(
                method=scope["method"].upper(),
                path=scope["path"],
                raw_path=(scope.get("raw_path") or b"").decode("latin-1"),
                query=parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True),
                headers={name.lower(): value for name, value in scope["headers"]},
            )
            handler = self._route(request)
            if request.method in MUTATING:
                self._authorize(request)
                request.body = await read_body(receive)
            return await handler(request)
        except HTTPError as exc:
            return HTTPResponse(exc.status, msgspec.json.encode({"error": exc.message}), headers=exc.headers)
        except Exception as exc:
            log.exception("admin: %s %s failed", scope["method"], scope["path"])
            return json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    def _route(self, request: HTTPRequest) -> Handler:
        methods = self._routes.get(request.path)
        if methods is None and request.path.startswith(QUOTA_PREFIX):
            # The salt is one segment of the path as sent: its '/' comes as %2F, and the salt
            # check then answers 400 (not 404). The decoded path is the fallback.
            encoded = request.raw_path.startswith(QUOTA_PREFIX)
            name = (request.raw_path if encoded else request.path)[len(QUOTA_PREFIX) :]
            if name and "/" not in name:
                request.salt_name = unquote(name) if encoded else name
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

    def _degraded_tiers(self) -> list[str]:
        return [
            f"{tier.name}: {tier.state}" + (f": {tier.reason}" if tier.reason else "")
            for tier in self.engine.status().l2
            if not tier.healthy
        ]

    def _broken(self) -> list[str]:
        """What keeps the server from serving that only a restart mends."""
        return (["shutting down"] if self.is_draining() else []) + self.engine.transfer.problems()

    async def _healthz(self, request: HTTPRequest) -> HTTPResponse:
        """Liveness: 503 only when the server itself cannot serve (draining, or a transfer
        backend a restart would mend: a CUDA context a sticky error left unusable). Unhealthy
        L2 tiers leave L1 serving, so they answer 200 "degraded": restarting would not mend them."""
        broken = self._broken()
        if broken:
            return json_response({"status": "unhealthy", "reasons": broken}, 503)
        degraded = self._degraded_tiers()
        if degraded:
            return json_response({"status": "degraded", "reasons": degraded})
        return json_response({"status": "ok"})

    async def _readyz(self, request: HTTPRequest) -> HTTPResponse:
        """Readiness: 503 while draining, the transfer backend is broken or an L2 tier is unhealthy."""
        reasons = self._broken() + self._degraded_tiers()
        if reasons:
            return json_response({"status": "unhealthy", "reasons": reasons}, 503)
        return json_response({"status": "ok"})

    async def _status(self, request: HTTPRequest) -> HTTPResponse:
        status = plain(self.engine.status())
        body = {
            "version": status.pop("server_version"),
            **status,
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
        body = json_body(request, required=False)
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
        status = self.engine.status()
        usage = {L1_TIER: status.l1.bytes_by_salt.get(salt, 0)}
        for tier in status.l2:
            usage[tier.name] = tier.usage.bytes_by_salt.get(salt, 0)
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
        body = json_body(request, required=True)
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
