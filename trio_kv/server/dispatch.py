"""The request table: request type -> async handler, checked against the protocol.

Every handler has one calling convention, ``async def handler(request) -> reply``;
``asynchronous`` adapts the few that never wait. The few that need to know which
connection asked (register, unregister, clear, hello) are wrapped in ``WithPeer`` and
are also given the request's ``Peer`` (None: a caller inside the server's process). The table must name every request
kind the protocol defines, and a handler's reply must be the type its request
declares (``protocol.REPLY_OF``); a mismatch is a server bug, answered as INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from ..core.peers import Peer
from ..errors import ErrorCode, TrioKVError
from ..protocol import REPLY_OF, RequestFor, error_reply

log = logging.getLogger(__name__)

A = TypeVar("A")

Handler = Callable[[Any], Awaitable[Any]]


class WithPeer:
    """A table entry whose handler is also given the connection the request came on."""

    def __init__(self, handler: Callable[[Any, Peer | None], Awaitable[Any]]) -> None:
        self.handler = handler


def internal_error(exc: Exception) -> Any:
    """The INTERNAL error reply for an exception no handler expected."""
    return error_reply(TrioKVError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))


def asynchronous(handler: Callable[..., A]) -> Callable[..., Awaitable[A]]:
    """Give a handler that never waits the table's calling convention."""

    async def run(*args: Any) -> A:
        return handler(*args)

    run.__name__ = getattr(handler, "__name__", run.__name__)
    run.__qualname__ = getattr(handler, "__qualname__", run.__qualname__)
    return run


class Dispatcher:
    """Answers a decoded request by calling its kind's handler and checking the reply's type."""

    def __init__(self, handlers: Mapping[type, Handler | WithPeer]) -> None:
        missing = REPLY_OF.keys() - handlers.keys()
        unknown = handlers.keys() - REPLY_OF.keys()
        if missing or unknown:
            raise ValueError(
                "the request table must cover exactly the protocol's request kinds: "
                f"missing {sorted(t.__name__ for t in missing)}, unknown {sorted(t.__name__ for t in unknown)}"
            )
        self._handlers = dict(handlers)

    @property
    def kinds(self) -> frozenset[type]:
        """The request types this table answers."""
        return frozenset(self._handlers)

    async def __call__(self, request: RequestFor[Any], peer: Peer | None = None) -> Any:
        """Run ``request``'s handler and return its reply, which is checked to be of the type
        ``request`` declares (the declared type is not spelled here: a decoded request is a
        union). Handler errors pass through; a reply of the wrong type raises INTERNAL."""
        request_type = type(request)
        entry = self._handlers[request_type]
        reply = await (entry.handler(request, peer) if isinstance(entry, WithPeer) else entry(request))
        expected = REPLY_OF[request_type]
        if not isinstance(reply, expected):
            log.error(
                "the %s handler answered %s instead of %s",
                request_type.__name__,
                type(reply).__name__,
                expected.__name__,
            )
            raise TrioKVError(
                ErrorCode.INTERNAL,
                f"the {request_type.__name__} handler answered {type(reply).__name__}, "
                f"not {expected.__name__}",
            )
        return reply
