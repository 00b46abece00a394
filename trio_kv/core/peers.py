"""Who a request came from: one client connection, as the engine's policy sees it. No sockets.

The server makes one ``Peer`` per nng pipe (``server/connections.py``) and passes it to
the handlers that need it: register and unregister (an instance belongs to the connection
that registered it), Hello (authentication) and Clear (every salt is an admin action).
A request with no peer comes from inside the server's process and is trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ErrorCode, TrioKVError


@dataclass(eq=False)
class Peer:
    """One connection. ``uid``/``pid`` are the peer's credentials where the transport knows
    them (ipc://), else None. ``closed`` is set (from nng's thread) once the pipe is gone;
    ``instances`` are the instance ids it registered and still holds."""

    pipe_id: int
    listener: str
    uid: int | None = None
    pid: int | None = None
    authenticated: bool = True
    admin: bool = False
    closed: bool = False
    instances: set[str] = field(default_factory=set)

    def describe(self) -> str:
        who = f"uid {self.uid}, pid {self.pid}" if self.uid is not None else "credentials unknown"
        return f"connection {self.pipe_id} on {self.listener} ({who})"


def require_admin(peer: Peer | None, what: str) -> None:
    """Raise PERMISSION_DENIED unless ``peer`` said the admin token (or is the server itself)."""
    if peer is not None and not peer.admin:
        raise TrioKVError(
            ErrorCode.PERMISSION_DENIED,
            f"{what} is an admin action: say the admin token in Hello, or use the admin API",
        )
