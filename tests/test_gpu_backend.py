"""Choosing the transfer backend, and what the CUDA path does on a host without a GPU:
imports work, "auto" falls back to the CPU path, and forcing "cuda" fails clearly at start-up."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import struct
import subprocess
import sys

import pytest
import torch
from cuda.bindings import driver

from trio_kv.core.l1 import L1Store
from trio_kv.server.config import ConfigError, load_config
from trio_kv.server.process import Server
from trio_kv.testing import running_server
from trio_kv.tools import bench_gpu
from trio_kv.transfer import (
    BACKENDS,
    CpuTransfer,
    CudaTransfer,
    CudaUnavailable,
    arena_pinner,
    select_backend,
)
from trio_kv.transfer.cuda import cuda_available, driver_status
from trio_kv.transfer.events import batch_attributes

no_device = pytest.mark.skipif(cuda_available(), reason="this host has a usable CUDA device")
with_device = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")


def test_cuda_modules_import_without_touching_the_driver():
    code = (
        "import trio_kv.transfer.cuda, trio_kv.export.ipc, trio_kv.transfer.events, trio_kv.tools.bench_gpu\n"
        "from trio_kv.transfer.events import driver_status\n"
        "assert driver_status.cache_info().currsize == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@no_device
def test_driver_status_says_why_cuda_is_unusable():
    reason = driver_status()
    assert isinstance(reason, str) and reason


@no_device
def test_auto_picks_the_cpu_path_without_a_device():
    backend = select_backend("auto")
    assert type(backend) is CpuTransfer
    assert backend.name == "cpu"


@no_device
def test_forcing_cuda_without_a_device_raises_a_clear_error():
    with pytest.raises(CudaUnavailable, match="transfer backend 'cuda' cannot start"):
        select_backend("cuda")


@with_device
@pytest.mark.gpu
def test_auto_picks_the_cuda_path_with_a_device():
    assert isinstance(select_backend("auto"), CudaTransfer)


def test_cpu_is_always_available():
    assert type(select_backend("cpu")) is CpuTransfer


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="available: auto, cpu, cuda"):
        select_backend("tpu")


@pytest.mark.parametrize("name", BACKENDS)
def test_config_accepts_every_backend(name):
    assert load_config(environ={}, overrides={"transfer": name}).transfer == name


def test_config_refuses_an_unknown_backend():
    with pytest.raises(ConfigError, match="transfer"):
        load_config(environ={}, overrides={"transfer": "gpu"})


@no_device
def test_server_forced_to_cuda_without_a_device_fails_at_construction():
    config = load_config(environ={}, overrides={"transfer": "cuda", "l1_size": "4MiB"})
    with pytest.raises(CudaUnavailable, match="cannot start"):
        Server(config)


@no_device
def test_serve_forced_to_cuda_without_a_device_exits_with_the_reason(tmp_path):
    env = {**os.environ, "TRIO_KV_TRANSFER": "cuda", "TRIO_KV_L1_SIZE": "4MiB", "TRIO_KV_NO_ADMIN": "true"}
    command = [sys.executable, "-m", "trio_kv", "serve", "--listen", f"ipc://{tmp_path}/s.sock"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "transfer backend 'cuda' cannot start" in done.stderr


async def test_cpu_server_leaves_the_arena_unpinned():
    async with running_server(transfer="cpu", l1_size="4MiB") as server:
        assert type(server.engine.transfer) is CpuTransfer
    assert arena_pinner(CpuTransfer()) is None


def test_l1_store_hands_its_arena_to_the_pin_hook_once():
    pinned: list[torch.Tensor] = []
    l1 = L1Store(1 << 20, pin=pinned.append)
    assert len(pinned) == 1
    assert pinned[0] is l1.arena


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_gpu.add_parser(parser.add_subparsers(dest="bench"))
    return parser.parse_args(["gpu", *argv])


@no_device
def test_bench_gpu_without_a_device_exits_2_with_a_message(capsys):
    assert bench_gpu.main(bench_args("--json")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "needs a CUDA device" in captured.err


def test_bench_gpu_refuses_nonsense_sizes_before_touching_cuda(capsys):
    assert bench_gpu.main(bench_args("--chunks", "0")) == 2
    assert "--chunks must be >= 1" in capsys.readouterr().err


def test_memcpy_attributes_are_laid_out_as_the_driver_reads_them():
    # events.py hands this struct's address to cuMemcpyBatchAsync through ctypes.
    attributes = batch_attributes()
    attributes.srcLocHint.id = 3
    attributes.dstLocHint.id = 5
    attributes.flags = 6
    fields = struct.unpack("<6i", ctypes.string_at(attributes.getPtr(), 24))
    assert fields == (int(driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM), 0, 3, 0, 5, 6)


class RecordingTransfer(CpuTransfer):
    """The CPU path, remembering the interprocess event each copy was asked to wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, bytes]] = []

    async def store(self, cache, jobs, *, ipc_event=b""):
        self.events.append(("store", ipc_event))
        await super().store(cache, jobs)

    async def retrieve(self, cache, jobs, *, ipc_event=b""):
        self.events.append(("retrieve", ipc_event))
        await super().retrieve(cache, jobs)


async def test_the_engine_hands_each_request_s_ipc_event_to_the_backend():
    from trio_kv.core.engine import CacheEngine, EngineSettings
    from trio_kv.keys import RequestKey
    from trio_kv.protocol import Lookup, Retrieve, Store
    from trio_kv.testing import make_kv_cache

    transfer = RecordingTransfer()
    engine = CacheEngine(EngineSettings(chunk_size=32), L1Store(1 << 22), transfer)
    tokens = list(range(64))
    with make_kv_cache(num_blocks=16, block_size=16, num_layers=2) as kv:
        engine.register(kv.register_request("w"))
        await engine.store(Store("w", RequestKey("m", 1, 0, tokens), [0, 1, 2, 3], ipc_event=b"E1" * 32))
        await engine.lookup(Lookup(RequestKey("m", 1, None, tokens, request_id="r")))
        key = RequestKey("m", 1, 0, tokens, request_id="r")
        await engine.retrieve(Retrieve("w", key, [4, 5, 6, 7], ipc_event=b"E2" * 32))
        await engine.store(Store("w", RequestKey("m", 1, 0, list(range(100, 132))), [8, 9]))
    assert transfer.events == [("store", b"E1" * 32), ("retrieve", b"E2" * 32), ("store", b"")]


async def test_clients_send_the_ipc_event_with_stores_and_retrieves():
    from trio_kv.client import AsyncClient
    from trio_kv.keys import RequestKey
    from trio_kv.testing import make_kv_cache

    async with running_server(chunk_size=32, transfer="cpu") as server:
        transfer = server.engine.transfer = RecordingTransfer()
        tokens = list(range(64))
        with make_kv_cache(num_blocks=16, block_size=16, num_layers=2) as kv:
            async with await AsyncClient.connect(server.url) as client:
                await client.register_kv_cache("w", kv)
                await client.store("w", RequestKey("m", 1, 0, tokens), [0, 1, 2, 3], ipc_event=b"S" * 64)
                await client.retrieve("w", RequestKey("m", 1, 0, tokens), [4, 5, 6, 7], ipc_event=b"R" * 64)
    assert transfer.events == [("store", b"S" * 64), ("retrieve", b"R" * 64)]


def test_auto_says_in_the_log_why_it_uses_the_cpu_path(caplog):
    from trio_kv.transfer import select_backend

    with caplog.at_level(logging.INFO, logger="trio_kv.transfer"):
        backend = select_backend("auto")
    if backend.name != "cpu":
        pytest.skip("a usable CUDA device is present")
    assert any("using cpu" in record.getMessage() for record in caplog.records), caplog.text
