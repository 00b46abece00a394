"""Typed errors: one enum of stable wire codes, one exception that carries it."""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Stable error codes sent on the wire. Never renumber; only append."""

    BAD_REQUEST = 1  # bytes that are not a valid message
    UNKNOWN_REQUEST = 2  # a well-formed message of a kind this server does not know
    VERSION_MISMATCH = 3
    MESSAGE_TOO_LARGE = 4
    INVALID_ARGUMENT = 5
    BAD_SALT = 6
    UNKNOWN_INSTANCE = 7
    BLOCK_OUT_OF_RANGE = 8
    LIMIT_EXCEEDED = 9
    TIMEOUT = 10
    INTERNAL = 11
    BAD_REGISTRATION = 12
    TRANSFER_FAILED = 13
    SHUTTING_DOWN = 14
    PERMISSION_DENIED = 15  # the connection may not do this (another's instance, another's file, admin)
    UNAUTHENTICATED = 16  # a listener that needs a token, and this connection has not said it in Hello


class TrioKVError(Exception):
    """An error with a stable code; raised inside the server and by clients."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class ServerError(TrioKVError):
    """Raised by clients when the server answered with an error reply."""


def single_cause(exc: BaseException) -> BaseException:
    """The exception inside nested one-member groups (each Trio nursery wraps what it raises)."""
    while (inner := getattr(exc, "exceptions", None)) and len(inner) == 1:
        exc = inner[0]
    return exc
