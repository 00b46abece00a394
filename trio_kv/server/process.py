"""The server process shape: one root nursery holding the IPC listeners and the engine's tasks.

Each ``--listen`` URL gets a pynng Rep0 socket served by a pool of context
tasks (recv -> decode -> handle -> send). Shutdown drains: new requests get
SHUTTING_DOWN while in-flight ones finish (up to a grace period), then every
task is cancelled and ipc:// socket files are removed.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pynng
import trio

from .. import __version__
from ..adapters.base import StoreMissing
from ..core.engine import CacheEngine, EngineSettings, FaultHook
from ..core.l1 import L1Store
from ..core.l2_tier import L2Tier
from ..core.peers import Peer
from ..core.quotas import L1_TIER, QuotaBook
from ..core.tiering import Tiering, TieringSettings
from ..errors import ErrorCode, TrioKVError, single_cause
from ..msgpack_peek import head_kind
from ..protocol import (
    PROTOCOL_VERSION,
    Clear,
    EndSession,
    Hello,
    HelloOk,
    Limits,
    Lookup,
    Ping,
    Pong,
    RegisterKVCache,
    ReleaseLookup,
    Retrieve,
    Status,
    Store,
    UnregisterKVCache,
    decode_request,
    encode,
    error_reply,
)
from ..transfer import arena_pinner, select_backend
from ..transfer.sched import set_thread_slice
from .admin import AdminApp
from .config import ConfigError, ServerConfig
from .connections import Connections
from .dispatch import Dispatcher, WithPeer, asynchronous, internal_error
from .http import start_admin
from .metrics import ServerMetrics
from .ratelog import RateLimitedLog
from .transport import ListenSockets, RawListener, ipc_path, open_raw_rep

log = logging.getLogger(__name__)

# nng drops (rather than answers) a message over recv_max_size; this slack lets
# moderately oversized messages reach the decoder and get a MESSAGE_TOO_LARGE reply.
_RECV_SLACK = 2
_SEND_TIMEOUT_MS = 5000
_FRAME_ERRORS = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_REQUEST, ErrorCode.MESSAGE_TOO_LARGE})


async def _start_tier(nursery: trio.Nursery, l2: L2Tier, spec: str) -> None:
    """Start one tier's task group; a store that does not exist (an S3 bucket) is a setting
    that is wrong, so it is raised as a ConfigError naming the ``--l2`` entry."""
    try:
        await nursery.start(l2.run)
    except BaseException as exc:
        cause = single_cause(exc)
        if isinstance(cause, StoreMissing):
            raise ConfigError(f"--l2 {spec}: {cause}") from None
        raise


class Server:
    """A trio-kv server: build it from a config, then ``await nursery.start(server.serve)``."""

    def __init__(
        self, config: ServerConfig, *, faults: FaultHook | None = None, config_path: str | None = None
    ) -> None:
        self.config = config
        self.limits = Limits(
            max_message_bytes=config.max_message_bytes,
            max_tokens_per_key=config.max_tokens_per_key,
            max_block_ids=config.max_block_ids,
            max_world_size=config.max_world_size,
            max_keys_per_request=config.max_keys_per_request,
            max_id_chars=config.max_id_chars,
        )
        settings = EngineSettings(
            chunk_size=config.chunk_size,
            lease_ttl_s=config.lease_ttl_s,
            session_ttl_s=config.session_ttl_s,
            max_sessions=config.max_sessions,
            max_session_bytes=config.max_session_bytes,
            inflight_wait_s=config.inflight_wait_s,
            inflight_max_waiters=max(1, config.workers // 2),
            limits=self.limits,
        )
        l2_specs = config.l2_specs()
        self.quotas = QuotaBook([L1_TIER, *(s.name for s in l2_specs)], config.quota_path(config_path))
        transfer = select_backend(
            config.transfer,
            threads=config.copy_threads,
            shm_dir=config.shm_dir,
            copy_timeout_s=config.gpu_copy_timeout_s,
        )
        self.l1 = L1Store(
            config.l1_size,
            high_watermark=config.evict_high_watermark,
            low_watermark=config.evict_low_watermark,
            policy=config.eviction_policy,
            quota=self.quotas.limiter(L1_TIER),
            pin=arena_pinner(transfer),
        )
        self.l2_tiers = [
            L2Tier.from_spec(spec, policy=config.eviction_policy, quota=self.quotas.limiter(spec.name))
            for spec in l2_specs
        ]
        self.tiering = (
            Tiering(
                self.l1,
                self.l2_tiers,
                TieringSettings(
                    queue_size=config.l2_queue_size,
                    writers_per_adapter=config.l2_writers,
                    lookup_timeout_s=config.l2_lookup_timeout_s,
                    load_timeout_s=config.l2_load_timeout_s,
                    load_concurrency=config.l2_load_concurrency,
                    write_timeout_s=config.l2_write_timeout_s,
                    max_inflight_writes=config.l2_max_inflight_writes,
                ),
            )
            if self.l2_tiers
            else None
        )
        self.engine = CacheEngine(settings, self.l1, transfer, tiering=self.tiering, faults=faults)
        self.metrics = ServerMetrics(self.engine, self.quotas)
        self.listeners: list[RawListener] = []
        self.metrics.dropped_replies = lambda: sum(listener.dropped_replies for listener in self.listeners)
        self.admin_url: str | None = None  # the admin HTTP URL actually bound, once serving
        self._admin_stop = trio.Event()
        self.draining = False
        self._idle = trio.Event()
        self._idle.set()
        self._sockets = ListenSockets()
        self._cancel_scope: trio.CancelScope | None = None
        self._bad_frames = RateLimitedLog(log)  # one line per 10 s, whatever a client sends
        # A registration lives as long as the connection that made it.
        self.connections = Connections(self.engine.drop_peer)
        self.dispatch = Dispatcher(
            {
                Hello: WithPeer(asynchronous(self._hello)),
                Ping: asynchronous(lambda _: Pong()),
                RegisterKVCache: WithPeer(self.engine.aregister),
                UnregisterKVCache: WithPeer(self.engine.unregister),
                Store: self.engine.store,
                Lookup: WithPeer(self.engine.lookup),
                Retrieve: self.engine.retrieve,
                ReleaseLookup: asynchronous(self.engine.release),
                EndSession: asynchronous(self.engine.end_session),
                Clear: WithPeer(self.engine.clear),
                Status: asynchronous(lambda _: self.engine.status()),
            }
        )
        # What handle_now answers on the listener's task, and the tags that send a frame there.
        self._answer_now: dict[type[msgspec.Struct], Callable[[Any, Peer | None], Any]] = {
            Lookup: self.engine.lookup_now,
            Ping: lambda _request, _peer: Pong(),
        }
        self._answered_now_tags = frozenset(kind.__struct_config__.tag for kind in self._answer_now)

    @property
    def urls(self) -> list[str]:
        return list(self.config.listen)

    async def serve(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (or ``shutdown``). Reports started once every URL listens."""
        if self.config.loop_slice_us:  # wake-ups preempt the copy threads (transfer/sched.py)
            set_thread_slice(self.config.loop_slice_us * 1000)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self.engine.run_housekeeping)
                nursery.start_soon(self.engine.owners.run)
                nursery.start_soon(self.l1.run_watermark_eviction)
                # Each L2 tier runs its own task group; its recovery scan finishes before we serve.
                for spec, l2 in zip(self.config.l2_specs(), self.l2_tiers):
                    await _start_tier(nursery, l2, spec.text)
                if self.tiering is not None:
                    await nursery.start(self.tiering.run)
                if self.config.allow_unauthenticated_tcp and not self.config.data_token:
                    for url in self.config.listen:
                        if url.startswith("tcp://"):
                            log.warning(
                                "%s accepts every peer that can reach it (allow_unauthenticated_tcp): "
                                "set data_token to require a token in Hello",
                                url,
                            )
                for url in self.config.listen:
                    sock = self._listen(url)
                    nursery.start_soon(self._serve_listener, sock, url)
                nursery.start_soon(self.metrics.run_loop_lag_probe, self.config.loop_lag_probe_s)
                if not self.config.no_admin:
                    self.admin_url = await start_admin(
                        nursery,
                        AdminApp(
                            config=self.config,
                            engine=self.engine,
                            quotas=self.quotas,
                            metrics=self.metrics,
                            is_draining=lambda: self.draining,
                        ),
                        self.config.admin_address(),
                        shutdown_trigger=self._admin_stop.wait,
                    )
                log.info(
                    "trio-kv %s serving on %s (L1 %d bytes, chunk %d tokens, L2: %s, admin: %s)",
                    __version__,
                    ", ".join(self.config.listen),
                    self.l1.capacity,
                    self.config.chunk_size,
                    ", ".join(t.name for t in self.l2_tiers) or "none",
                    self.admin_url or "off",
                )
                task_status.started(self)
        finally:
            self._sockets.close()
            self._save_quotas()
            with trio.CancelScope(shield=True):  # bounded: close what is still mapped
                await self.engine.aclose()

    def _save_quotas(self) -> None:
        """Last chance for a quota change whose save failed earlier to reach the state file."""
        try:
            self.quotas.save_now()
        except OSError as exc:
            log.error("quota changes not saved to %s: %s", self.quotas.path, exc)

    def _listen(self, url: str) -> pynng.Rep0:
        # A reply that cannot be handed to its pipe within the send timeout is dropped, so a
        # peer that never reads cannot hold a worker context.
        sock = open_raw_rep(
            recv_max_size=self.config.max_message_bytes * _RECV_SLACK, send_timeout=_SEND_TIMEOUT_MS
        )
        try:
            # ipc:// peers are who the socket file's mode lets in; tcp:// peers say the data token.
            token = ipc_path(url) is None and bool(self.config.data_token)
            self.connections.attach(sock, url, needs_token=token)
            self._sockets.listen(sock, url, self.config.socket_permissions())
        except BaseException:
            sock.close()
            raise
        return sock

    async def wait_idle(self) -> None:
        """Return once no request is being handled."""
        await self._idle.wait()

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Answer new requests with SHUTTING_DOWN, wait for in-flight ones (up to ``grace_s``), stop."""
        self.draining = True
        with trio.move_on_after(grace_s):
            await self._idle.wait()
        if self.engine.requests_in_flight:
            log.warning("shutting down with %d requests still in flight", self.engine.requests_in_flight)
        self._admin_stop.set()
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _serve_listener(self, sock: pynng.Rep0, url: str) -> None:
        peer_by_id = self.connections.peer_by_id

        async def handle(buf: bytes, pipe_id: int) -> bytes:
            return await self.handle(buf, peer_by_id(pipe_id, url))

        def handle_now(buf: bytes, pipe_id: int) -> bytes | None:
            return self.handle_now(buf, peer_by_id(pipe_id, url))

        listener = RawListener(sock, handle, workers=self.config.workers, handle_now=handle_now)
        self.listeners.append(listener)
        await listener.serve()

    async def handle(self, buf: bytes, peer: Peer | None = None) -> bytes:
        """Answer one encoded request from ``peer`` (None: from inside this process) with one
        encoded reply, and count it in the metrics. Never raises (but Cancelled; a cancelled
        request is not counted)."""
        engine = self.engine
        engine.requests_in_flight += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        started = time.perf_counter()
        request = None
        try:
            if self.draining:
                raise TrioKVError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
            request = decode_request(buf, self.config.max_message_bytes)
            if peer is not None and not peer.authenticated and not isinstance(request, (Hello, Ping)):
                raise TrioKVError(ErrorCode.UNAUTHENTICATED, f"{peer.listener} needs a token in Hello first")
            with trio.fail_after(self.config.request_timeout_s):
                reply = await self.dispatch(request, peer)
        except TrioKVError as exc:
            reply = error_reply(exc)
            if request is None and exc.code in _FRAME_ERRORS:
                self._bad_frames.note(
                    f"refused a frame of {len(buf)} bytes: {exc.code.name}: {exc.message[:200]}"
                )
        except trio.TooSlowError:
            reply = error_reply(
                TrioKVError(
                    ErrorCode.TIMEOUT, f"request did not finish within {self.config.request_timeout_s} s"
                )
            )
        except Exception as exc:
            log.exception("internal error while handling a request")
            reply = internal_error(exc)
        finally:
            engine.requests_in_flight -= 1
            if engine.requests_in_flight == 0:
                self._idle.set()
        return self._answer(request, reply, started)

    def handle_now(self, buf: bytes, peer: Peer | None = None) -> bytes | None:
        """``handle``'s reply where it needs no wait: a Ping, or a Lookup of chunks L1 holds
        with none in flight and no L2 to ask (``CacheEngine.lookup_now``). None where it
        would wait or is not one of those (nothing was done; ``handle`` answers it). The
        listener calls this on the loop's own task, so such a request costs no task switch,
        no channel and no cancel scope, and many are answered per wake-up."""
        if self.draining or head_kind(buf) not in self._answered_now_tags:
            return None
        started = time.perf_counter()
        try:
            request = decode_request(buf, self.config.max_message_bytes)
        except TrioKVError:
            return None  # handle refuses it (and logs the bad frame)
        answer_now = self._answer_now.get(type(request))
        if answer_now is None or (peer is not None and not peer.authenticated and type(request) is not Ping):
            return None
        reply: Any
        try:
            reply = answer_now(request, peer)
            if reply is None:
                return None
        except TrioKVError as exc:
            reply = error_reply(exc)
        except Exception as exc:
            log.exception("internal error while handling a request")
            reply = internal_error(exc)
        return self._answer(request, reply, started)

    def _answer(self, request: Any, reply: Any, started: float) -> bytes:
        """Count the answered request in the metrics and encode its reply."""
        try:
            self.metrics.record_request(request, reply, time.perf_counter() - started)
        except Exception:  # a metrics bug must not cost the client its reply
            log.exception("recording request metrics failed")
        try:
            return encode(reply)
        except Exception as exc:
            log.exception("a reply could not be encoded")
            return encode(internal_error(exc))

    def _hello(self, request: Hello, peer: Peer | None) -> HelloOk:
        if request.protocol_version != PROTOCOL_VERSION:
            raise TrioKVError(
                ErrorCode.VERSION_MISMATCH,
                f"client speaks protocol {request.protocol_version}; this server speaks {PROTOCOL_VERSION}",
            )
        if peer is not None:
            self._authenticate(request.token, peer)
        return HelloOk(
            protocol_version=PROTOCOL_VERSION,
            server_version=__version__,
            chunk_size=self.config.chunk_size,
            limits=self.limits,
        )

    def _authenticate(self, token: str, peer: Peer) -> None:
        """Mark ``peer`` authenticated (data or admin token) or admin (admin token). No token
        changes nothing; a wrong one is refused, so a misconfigured client fails at connect."""
        if not token:
            if not peer.authenticated:
                raise TrioKVError(ErrorCode.UNAUTHENTICATED, f"{peer.listener} needs a token in Hello")
            return
        given = token.encode()
        admin, data = self.config.admin_token.encode(), self.config.data_token.encode()
        if admin and hmac.compare_digest(given, admin):
            peer.authenticated = peer.admin = True
        elif data and hmac.compare_digest(given, data):
            peer.authenticated = True
        else:
            raise TrioKVError(ErrorCode.UNAUTHENTICATED, "the token in Hello is not valid here")
