"""Decode bombs: small or limit-sized frames built to make a msgpack decoder recurse, allocate or
loop. Each must get a typed BAD_REQUEST or UNKNOWN_REQUEST reply, at once, from a server that
keeps serving. Used by the soak (over a raw socket, as a hostile client would send them) and by
the tests of malformed frames.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pynng
import trio

from ..errors import ErrorCode
from ..protocol import Error, decode_reply

# The replies a bomb may get; anything else (INTERNAL above all) is a wrong reply.
BOMB_REPLIES = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_REQUEST})


def _array(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return (b"\xdc" + n.to_bytes(2, "big")) if n < 2**16 else (b"\xdd" + n.to_bytes(4, "big"))


def _str(text: str) -> bytes:
    raw = text.encode()
    assert len(raw) < 32, "fixstr only"
    return bytes([0xA0 | len(raw)]) + raw


# A key (array of 7) with empty tokens: enough for a typed decode to reach the next field.
_KEY = b"\x97" + _str("m") + b"\x01\x00\x90\x00\xc0" + _str("")


def nested_arrays(kind: str, size: int) -> bytes:
    """``[kind, [[[[...]]]]]``: one nesting level per byte."""
    return b"\x92" + _str(kind) + b"\x91" * (size - 3 - len(_str(kind))) + b"\x90"


def nested_maps(kind: str, size: int) -> bytes:
    """``[kind, {nil: {nil: ...}}]``: one level per two bytes."""
    return b"\x92" + _str(kind) + b"\x81\xc0" * ((size - 2 - len(_str(kind))) // 2) + b"\xc0"


def empty_arrays(size: int) -> bytes:
    """``[[], [], ...]``: one empty array per byte, no kind at all."""
    n = size - 5
    return _array(n) + b"\x90" * n


def empty_arrays_as_block_ids(size: int) -> bytes:
    """A store whose ``list[int]`` of block ids holds millions of empty arrays."""
    head = b"\x94" + _str("store") + _str("w") + _KEY
    n = size - len(head) - 5
    return head + _array(n) + b"\x90" * n


def huge_map(size: int) -> bytes:
    """A clear whose salt is a map claiming millions of nil -> nil entries."""
    n = (size - 16) // 2
    return b"\x92" + _str("clear") + b"\xdf" + n.to_bytes(4, "big") + b"\xc0\xc0" * n


def unknown_kind_of_empty_arrays(size: int) -> bytes:
    """An unknown kind followed by millions of empty arrays."""
    n = size - 20
    return b"\x92" + _str("teleport") + _array(n) + b"\x90" * n


def tensor_specs(size: int) -> bytes:
    """A registration naming millions of 6-byte tensor specs."""
    head = b"\x96" + _str("register") + _str("w") + b"\x10"
    spec = b"\x95\x00\xa0\x90\x90\x00"  # [0, "", [], [], 0]
    n = (size - len(head) - 20) // len(spec)
    return head + _array(n) + spec * n + _str("") + b"\x00"


BOMBS: dict[str, Callable[[int], bytes]] = {
    "nested_arrays_ping": lambda size: nested_arrays("ping", size),
    "nested_arrays_lookup": lambda size: nested_arrays("lookup", size),
    "nested_arrays_unknown": lambda size: nested_arrays("teleport", size),
    "nested_maps_lookup": lambda size: nested_maps("lookup", size),
    "empty_arrays": empty_arrays,
    "empty_arrays_as_block_ids": empty_arrays_as_block_ids,
    "huge_map": huge_map,
    "unknown_kind_of_empty_arrays": unknown_kind_of_empty_arrays,
    "tensor_specs": tensor_specs,
}


@dataclass
class BombCounts:
    sent: int = 0
    wrong_replies: int = 0  # a reply other than BAD_REQUEST / UNKNOWN_REQUEST, or none


async def bomb_loop(url: str, deadline: float, counts: BombCounts, seed: int, *, frame_bytes: int) -> None:
    """Until ``deadline``, send a random bomb of ``frame_bytes`` over a raw Req0 socket and check
    the reply; each reply must come within 10 s (a stalled server counts as a wrong reply)."""
    rng = random.Random(seed)
    names = sorted(BOMBS)
    with pynng.Req0(resend_time=-1) as sock:
        sock.dial(url, block=True)
        while trio.current_time() < deadline:
            frame = BOMBS[rng.choice(names)](frame_bytes)
            counts.sent += 1
            reply = None
            with trio.move_on_after(10):
                await sock.asend(frame)
                reply = decode_reply(await sock.arecv())
            if not (isinstance(reply, Error) and reply.code in BOMB_REPLIES):
                counts.wrong_replies += 1
            await trio.sleep(rng.uniform(0.01, 0.1))
