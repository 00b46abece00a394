"""A CUDA context a sticky error left unusable fails liveness, against the stub driver.

After an illegal address (and the other errors CUDA calls sticky) every later call in the
process's context fails the same way until the process restarts: the server would answer
TRANSFER_FAILED for ever while looking alive. So /healthz and /readyz answer 503 and name the
device; an ordinary copy failure leaves them alone.
"""

from __future__ import annotations

import textwrap

from tests import test_gpu_stub
from tests.test_gpu_stub import PRELUDE, check

stub_env = test_gpu_stub.stub_env  # the fixture that builds the stub driver

STICKY_ERROR_FAILS_LIVENESS = PRELUDE + textwrap.dedent(
    """
    from trio_kv.client import AsyncClient, ServerError
    from trio_kv.keys import RequestKey
    from trio_kv.testing import admin_request, running_server

    async def store(engine, export, first_token):
        key = RequestKey(model="m", world_size=1, rank=0, tokens=list(range(first_token, first_token + 8)))
        try:
            await engine.store("engine", key, [5, 2], ipc_event=export.record_event(stream=0))
        except ServerError as exc:
            return exc.code
        return None

    async def main():
        async with running_server(transfer="cuda", chunk_size=8, l1_size="8MiB") as server:
            export = CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
            async with await AsyncClient.connect(server.url) as engine:
                await engine.register(export.register_request("engine"))
                assert await store(engine, export, 0) is None
                assert (await admin_request(server, "GET", "/healthz")).status == 200

                counter("stub_fail_sync", ctypes.c_int).value = 1  # CUDA_ERROR_INVALID_VALUE: not sticky
                assert await store(engine, export, 100) is ErrorCode.TRANSFER_FAILED
                assert (await admin_request(server, "GET", "/healthz")).status == 200

                counter("stub_fail_sync", ctypes.c_int).value = 700  # CUDA_ERROR_ILLEGAL_ADDRESS
                assert await store(engine, export, 200) is ErrorCode.TRANSFER_FAILED
                counter("stub_fail_sync", ctypes.c_int).value = 0
                live = await admin_request(server, "GET", "/healthz")
                assert live.status == 503, live.json()
                [reason] = live.json()["reasons"]
                assert "CUDA device 0" in reason and "700" in reason and "restart" in reason, reason
                ready = await admin_request(server, "GET", "/readyz")
                assert ready.status == 503 and ready.json()["reasons"] == [reason]
        print("sticky ok")

    trio.run(main)
    """
)


def test_a_sticky_cuda_error_fails_liveness_and_names_the_device(stub_env):
    check(STICKY_ERROR_FAILS_LIVENESS, stub_env, "sticky ok", timeout=60)
