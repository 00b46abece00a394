"""The request table: every request kind declares one reply type and has one server handler,
and a handler that answers with the wrong type is a typed INTERNAL error, not a wrong reply."""

from __future__ import annotations

import typing

import pytest

from trio_kv.errors import ErrorCode, TrioKVError
from trio_kv.protocol import (
    REPLY_OF,
    Error,
    Ping,
    Pong,
    Reply,
    Request,
    Status,
    StatusResult,
    decode_reply,
    encode,
    reply_type,
)
from trio_kv.server.dispatch import Dispatcher, asynchronous

REQUEST_TYPES = typing.get_args(Request)
REPLY_TYPES = typing.get_args(Reply)


def table_answering(reply_for: typing.Callable[[typing.Any], typing.Any]) -> dict[type, typing.Any]:
    return {kind: asynchronous(reply_for) for kind in REQUEST_TYPES}


def test_every_request_kind_declares_exactly_one_reply_kind():
    assert set(REPLY_OF) == set(REQUEST_TYPES)
    for request_type in REQUEST_TYPES:
        declared = reply_type(request_type)
        assert declared in REPLY_TYPES and declared is not Error, request_type
    # No two request kinds share a reply kind, so a reply names the request it answers.
    assert len(set(REPLY_OF.values())) == len(REPLY_OF)


def test_reply_type_is_read_from_the_request_class():
    assert reply_type(Ping) is Pong
    assert reply_type(Status) is StatusResult


async def test_the_server_table_has_one_handler_per_request_kind(server):
    assert server.server.dispatch.kinds == frozenset(REQUEST_TYPES)


def test_a_table_missing_a_request_kind_is_refused():
    table = table_answering(lambda _: Pong())
    del table[Status]
    with pytest.raises(ValueError, match="missing \\['Status'\\]"):
        Dispatcher(table)


def test_a_table_with_a_type_that_is_not_a_request_kind_is_refused():
    table = table_answering(lambda _: Pong())
    table[Pong] = asynchronous(lambda _: Pong())
    with pytest.raises(ValueError, match="unknown \\['Pong'\\]"):
        Dispatcher(table)


async def test_a_handler_reply_of_the_declared_type_is_returned():
    dispatch = Dispatcher(table_answering(lambda _: Pong()))
    assert await dispatch(Ping()) == Pong()


async def test_a_handler_reply_of_another_type_is_an_internal_error():
    dispatch = Dispatcher(table_answering(lambda _: Pong()))
    with pytest.raises(TrioKVError) as err:
        await dispatch(Status())
    assert err.value.code is ErrorCode.INTERNAL
    assert "Status handler answered Pong, not StatusResult" in err.value.message


async def test_handler_errors_pass_through_the_table():
    def refuse(_: object) -> Pong:
        raise TrioKVError(ErrorCode.BAD_REQUEST, "no")

    with pytest.raises(TrioKVError) as err:
        await Dispatcher(table_answering(refuse))(Ping())
    assert err.value.code is ErrorCode.BAD_REQUEST


async def test_the_server_answers_a_mistyped_handler_reply_with_an_internal_error_reply(server):
    server.server.dispatch = Dispatcher(table_answering(lambda _: Pong()))
    reply = decode_reply(await server.server.handle(encode(Status())))
    assert isinstance(reply, Error)
    assert reply.code == ErrorCode.INTERNAL
    assert "StatusResult" in reply.message
    assert decode_reply(await server.server.handle(encode(Ping()))) == Pong()
