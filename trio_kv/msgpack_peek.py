"""Peek at a msgpack frame's kind tag without decoding the frame.

A request is a msgpack array whose first element is its kind; when the typed decode refuses a
frame, this tells an unknown kind from a malformed known one by reading two headers by hand, so
nothing else of a hostile frame (nesting bombs, millions of elements) is ever decoded.
"""

from __future__ import annotations

_STR_LENGTH_BYTES = {0xD9: 1, 0xDA: 2, 0xDB: 4}  # str8, str16, str32


def head_kind(buf: bytes) -> str | None:
    """A frame's kind tag, read by hand from its array header and first element's str header:
    nothing else of a hostile frame is decoded. None when the frame does not start so."""
    lead = buf[0] if buf else 0
    if 0x90 <= lead <= 0x9F:  # fixarray
        count, pos = lead & 0x0F, 1
    elif lead in (0xDC, 0xDD):  # array16, array32
        pos = 3 if lead == 0xDC else 5
        count = int.from_bytes(buf[1:pos], "big")
    else:
        return None
    if count == 0 or pos >= len(buf):
        return None
    if 0xA0 <= buf[pos] <= 0xBF:  # fixstr
        size, start = buf[pos] & 0x1F, pos + 1
    elif buf[pos] in _STR_LENGTH_BYTES:
        start = pos + 1 + _STR_LENGTH_BYTES[buf[pos]]
        size = int.from_bytes(buf[pos + 1 : start], "big")
    else:
        return None
    # 64 chars: longer than any kind, so a cut-off head still reads as unknown.
    return buf[start : start + min(size, 64)].decode(errors="replace")
