"""Decode bombs: every malformed frame, however built, gets a typed BAD_REQUEST or
UNKNOWN_REQUEST at once, in bounded memory, with one rate-limited log line; the server keeps
serving. The bounds are generous (a 16 MB bomb took 5-8 s before; now well under a millisecond)."""

from __future__ import annotations

import logging
import time

import pynng
import pytest
import trio

from trio_kv.errors import ErrorCode, TrioKVError
from trio_kv.protocol import Error, Pong, decode_reply, decode_request, encode
from trio_kv.protocol import Ping as PingRequest
from trio_kv.server.ratelog import RateLimitedLog
from trio_kv.testing import running_server
from trio_kv.tools.bombs import BOMBS, nested_arrays

LIMIT = 16 * 1024**2
BOMB_SIZE = LIMIT - 51  # just under the default max_message_bytes
UNKNOWN = {"nested_arrays_unknown", "unknown_kind_of_empty_arrays"}


def expected_code(name: str) -> ErrorCode:
    return ErrorCode.UNKNOWN_REQUEST if name in UNKNOWN else ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_limit_sized_bomb_is_refused_with_a_typed_error_within_a_second(name):
    frame = BOMBS[name](BOMB_SIZE)
    assert len(frame) <= LIMIT
    started = time.perf_counter()
    with pytest.raises(TrioKVError) as err:
        decode_request(frame, LIMIT)
    assert time.perf_counter() - started < 1.0
    assert err.value.code == expected_code(name)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_100_kb_bomb_is_refused_with_a_typed_error(name):
    with pytest.raises(TrioKVError) as err:
        decode_request(BOMBS[name](100_000), LIMIT)
    assert err.value.code == expected_code(name)


def test_nesting_past_the_depth_limit_in_a_skipped_field_is_a_bad_request():
    # Ping has no fields: the decoder skips the rest, recursing, and hits the depth limit.
    with pytest.raises(TrioKVError) as err:
        decode_request(nested_arrays("ping", 100_000), LIMIT)
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert "nested too deeply" in err.value.message


@pytest.mark.parametrize(
    "frame",
    [
        b"\xdc\x00\x02\xa8teleport\x00",  # array16 head
        b"\xdd\x00\x00\x00\x02\xd9\x08teleport\x00",  # array32, str8
        b"\x92\xda\x00\x08teleport\x00",  # str16
        b"\x92\xdb\x00\x00\x00\x08teleport\x00",  # str32
    ],
)
def test_an_unknown_kind_is_read_from_any_array_and_str_header(frame):
    with pytest.raises(TrioKVError) as err:
        decode_request(frame, LIMIT)
    assert err.value.code == ErrorCode.UNKNOWN_REQUEST
    assert "teleport" in err.value.message


def test_a_very_long_unknown_kind_is_named_in_a_short_message():
    kind = "k" * 100_000
    frame = b"\x92\xdb" + len(kind).to_bytes(4, "big") + kind.encode() + b"\x00"
    with pytest.raises(TrioKVError) as err:
        decode_request(frame, LIMIT)
    assert err.value.code == ErrorCode.UNKNOWN_REQUEST
    assert len(err.value.message) < 1000


async def test_bombs_through_the_server_get_typed_replies_and_one_log_line(caplog):
    caplog.set_level(logging.DEBUG, logger="trio_kv")
    async with running_server(no_admin=True) as server:
        for name in sorted(BOMBS):
            for _ in range(5):
                reply = decode_reply(await server.server.handle(BOMBS[name](100_000)))
                assert isinstance(reply, Error)
                assert reply.code == expected_code(name), (name, reply.message)
        assert isinstance(decode_reply(await server.server.handle(encode(PingRequest()))), Pong)
    assert not any(r.exc_info for r in caplog.records)
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1
    assert "refused a frame" in records[0].getMessage()


async def test_three_limit_sized_bombs_at_once_do_not_stall_the_server():
    frames = [
        BOMBS[name](BOMB_SIZE) for name in ("empty_arrays", "empty_arrays_as_block_ids", "tensor_specs")
    ]
    codes: list[int] = []
    async with running_server(no_admin=True) as server:

        async def send(frame: bytes) -> None:
            with pynng.Req0(resend_time=-1) as sock:
                sock.dial(server.url, block=True)
                await sock.asend(frame)
                reply = decode_reply(await sock.arecv())
                assert isinstance(reply, Error)
                codes.append(reply.code)

        started = time.perf_counter()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for frame in frames:
                    nursery.start_soon(send, frame)
        # Before: 17 s for three; the frames' transfer over the socket is most of what is left.
        assert time.perf_counter() - started < 5.0
    assert codes == [ErrorCode.BAD_REQUEST] * 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limited_log_logs_once_per_interval_and_counts_what_it_held_back(caplog):
    clock = FakeClock()
    logger = logging.getLogger("trio_kv.test.ratelog")
    caplog.set_level(logging.WARNING, logger=logger.name)
    ratelog = RateLimitedLog(logger, interval_s=10.0, clock=clock)
    for _ in range(100):
        ratelog.note("bad frame")
        clock.now += 0.05  # 100 notes in 5 s
    clock.now = 10.0
    ratelog.note("bad frame")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad frame", "bad frame (99 more like it not logged)"]
