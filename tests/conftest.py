"""Shared fixtures: a real in-process server on a temporary ipc:// socket, a shared-memory
KV cache registered with it, and an async client; and Trio tests' skip reasons kept."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from trio_kv.client import AsyncClient
from trio_kv.testing import make_kv_cache, running_server

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

CHUNK_SIZE = 32  # small chunks keep tests fast: 2 blocks of 16 tokens per chunk
BLOCK_SIZE = 16


@pytest.fixture
async def server():
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB") as running:
        yield running


@pytest.fixture
def kv():
    with make_kv_cache(
        num_blocks=64, block_size=BLOCK_SIZE, num_layers=2, num_kv_heads=2, head_size=32
    ) as cache:
        yield cache


@pytest.fixture
async def client(server, kv):
    async with await AsyncClient.connect(server.url, timeout_s=10) as connected:
        await connected.register_kv_cache("worker-0", kv)
        yield connected


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    """pytest-trio 0.8 re-raises a Trio test's ``pytest.skip(reason)`` or ``pytest.xfail(reason)``
    as a bare ``pytest.skip()`` / ``pytest.xfail()`` (trio-kv's tests: `-rs` printed "Skipped" and
    no reason). The original is that exception's ``__context__``, alone in an exception group:
    raise it instead, so the report says why and where."""
    try:
        return (yield)
    except (pytest.skip.Exception, pytest.xfail.Exception) as outcome:
        original = _only_leaf(outcome.__context__)
        if type(original) is type(outcome):
            raise original from None
        raise


def _only_leaf(error: BaseException | None) -> BaseException | None:
    """The one exception inside nested exception groups, else None."""
    while isinstance(error, BaseExceptionGroup):
        if len(error.exceptions) != 1:
            return None
        error = error.exceptions[0]
    return error
