"""Slow and dead peers cannot stall anyone else."""

from __future__ import annotations

import socket

import pynng
import trio

from trio_kv.client import AsyncClient
from trio_kv.protocol import Status, encode
from trio_kv.testing import assert_no_leaks, running_server


def free_tcp_url() -> tuple[str, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}", port


async def test_half_sent_messages_and_clients_that_never_read_do_not_stall_others():
    url, port = free_tcp_url()
    async with running_server(listen=[url], workers=4, allow_unauthenticated_tcp=True) as server:
        # A peer that sends a third of nng's handshake and then nothing.
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"\x00SP")
        # A peer that sends far more requests than the server has workers and reads no reply.
        lazy = pynng.Req0(resend_time=-1)
        lazy.dial(url, block=True)
        contexts = []
        for _ in range(100):
            ctx = lazy.new_context()
            await ctx.asend(encode(Status()))
            contexts.append(ctx)
        with trio.fail_after(5):
            async with await AsyncClient.connect(url, timeout_s=5) as client:
                for _ in range(20):
                    await client.ping()
        half.close()
        for ctx in contexts:
            ctx.close()
        lazy.close()
        with trio.fail_after(5):
            await server.server.wait_idle()
        assert_no_leaks(server)


async def test_a_client_that_disconnects_mid_request_does_not_stop_the_server():
    async with running_server() as server:
        for _ in range(20):
            with pynng.Req0(resend_time=-1) as sock:
                sock.dial(server.url, block=True)
                await sock.asend(encode(Status()))
        async with await AsyncClient.connect(server.url) as client:
            await client.ping()
        assert_no_leaks(server)
