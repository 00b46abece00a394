"""``trio-kv bench gpu``: the CUDA transfer path against a pinned ``cudaMemcpyAsync`` in the same run.

For two KV layouts of Llama-3-8B's shape (per layer: 2 x block x 16 tokens x 8
heads x 128, bf16) it stores chunks from device blocks into a pinned L1 arena
and retrieves them into other blocks through ``CudaTransfer`` (plan, batched
copies, completion wait), and times one ``cuMemcpyDtoHAsync`` /
``cuMemcpyHtoDAsync`` of the same number of bytes between one device buffer and
the same arena. Layouts:

- ``cross_layer``: one tensor (blocks, layers, 2, 16, 8, 128): one 2 MiB piece per block;
- ``per_layer``: a tensor per layer (2, blocks, 16, 8, 128): 32 KiB pieces, 2 per block per layer.

Block ids are a random permutation, so pieces of neighbouring blocks rarely
coalesce (the worst case for per-layer). The KV cache is mapped with
``open_local`` (device memory of this process), so IPC is not part of the
timing; the copies, plan and waits are the server's own. Retrieved blocks are
stored again and compared with the first store, and the first store with what
the CPU path gathers from a host copy of the same bytes.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import torch
import trio
from cuda.bindings import driver

from ..export.cuda_driver import call
from ..protocol import TensorSpec
from ..transfer.cpu import CopyJob, MappedKVCache
from ..transfer.cuda import CudaTransfer
from ..transfer.events import driver_status
from ..transfer.layout import plan_layout
from ..transfer.plan import ChunkCopy, plan_copies
from . import bench_refs as refs
from .common import BenchFailed, bad_counts, emit, run_or_fail

CHUNK_TOKENS = 256
BLOCK_TOKENS = 16
KV_HEADS = 8
HEAD_SIZE = 128
ELEMENT_BYTES = 2  # bf16
TARGET_RATIO = 0.8
LAYOUTS = ("cross_layer", "per_layer")


class LayoutResult(msgspec.Struct):
    layout: str
    piece_bytes: int
    pieces_per_round: int  # after coalescing
    store_gbps: float
    retrieve_gbps: float
    memcpy_d2h_gbps: float
    memcpy_h2d_gbps: float
    store_ratio: float
    retrieve_ratio: float
    verified: bool


class GpuBenchResult(msgspec.Struct):
    device: int
    chunks: int
    chunk_bytes: int
    layers: int
    rounds: int
    target_ratio: float
    layouts: list[LayoutResult]


def add_parser(bench_subparsers: Any) -> None:
    """Add ``gpu`` to ``trio-kv bench``'s subcommands."""
    gpu = bench_subparsers.add_parser(
        "gpu",
        help="store/retrieve on the CUDA path vs a pinned cudaMemcpyAsync of the same bytes",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    gpu.add_argument("--json", action="store_true", help="print one JSON object")
    gpu.add_argument("--chunks", type=int, default=16, help="chunks copied per round (default 16)")
    gpu.add_argument("--rounds", type=int, default=5, help="timed rounds; the best is reported (default 5)")
    gpu.add_argument("--layers", type=int, default=32, help="model layers (default 32)")
    gpu.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")


def _specs(layout: str, layers: int, num_blocks: int) -> list[TensorSpec]:
    """Contiguous tensor descriptions, each at offset 0 of its own allocation."""
    if layout == "cross_layer":
        shapes = [[num_blocks, layers, 2, BLOCK_TOKENS, KV_HEADS, HEAD_SIZE]]
        block_dim = 0
    else:
        shapes = [[2, num_blocks, BLOCK_TOKENS, KV_HEADS, HEAD_SIZE]] * layers
        block_dim = 1
    specs = []
    for shape in shapes:
        strides = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
        specs.append(TensorSpec(0, "bfloat16", list(shape), strides, block_dim))
    return specs


def _nbytes(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape)) * ELEMENT_BYTES


async def _timed(function: Any, *args: Any) -> float:
    start = time.perf_counter()
    await function(*args)
    return time.perf_counter() - start


def _raw_copy(
    transfer: CudaTransfer, device: int, stream: Any, copy: Any, dst: int, src: int, n: int
) -> None:
    """The reference: one async copy and a wait for it (blocking; run in a thread)."""
    transfer.devices[device].activate()
    call(copy, dst, src, n, stream)
    call(driver.cuStreamSynchronize, stream)


async def _bench_layout(
    transfer: CudaTransfer, layout: str, args: argparse.Namespace, arena: torch.Tensor, check: torch.Tensor
) -> LayoutResult:
    blocks_per_chunk = CHUNK_TOKENS // BLOCK_TOKENS
    moved_blocks = args.chunks * blocks_per_chunk
    num_blocks = 2 * moved_blocks
    specs = _specs(layout, args.layers, num_blocks)
    device = transfer.devices[args.device]
    device.activate()
    pointers: list[int] = []
    host_copies: list[np.ndarray] = []
    stream = call(driver.cuStreamCreate, driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
    try:
        for index, spec in enumerate(specs):
            nbytes = _nbytes(spec)
            pointers.append(int(call(driver.cuMemAlloc, nbytes)))
            pattern = (np.arange(nbytes // 4, dtype=np.uint32) * 2654435761 + index).view(np.uint8)
            host_copies.append(pattern)
            call(driver.cuMemcpyHtoD, pointers[-1], pattern.ctypes.data, nbytes)
        cache = transfer.open_local(
            specs, BLOCK_TOKENS, pointers, [_nbytes(s) for s in specs], device=args.device
        )
        chunk_bytes = cache.layout.chunk_bytes(blocks_per_chunk)
        total = args.chunks * chunk_bytes
        order = list(range(num_blocks))
        random.Random(7).shuffle(order)
        sources, targets = order[:moved_blocks], order[moved_blocks:]

        def jobs(blocks: Sequence[int], area: torch.Tensor) -> list[CopyJob]:
            return [
                CopyJob(
                    blocks[i * blocks_per_chunk : (i + 1) * blocks_per_chunk],
                    area[i * chunk_bytes : (i + 1) * chunk_bytes],
                )
                for i in range(args.chunks)
            ]

        store_jobs, retrieve_jobs = jobs(sources, arena), jobs(targets, arena)
        pieces = len(
            plan_copies(
                cache.layout,
                [ChunkCopy(j.block_ids, j.buffer.data_ptr(), j.buffer.numel()) for j in store_jobs],
            )
        )
        reference = int(call(driver.cuMemAlloc, total))
        pointers.append(reference)
        best = dict.fromkeys(("store", "retrieve", "d2h", "h2d"), float("inf"))
        for _ in range(args.rounds):
            best["store"] = min(best["store"], await _timed(transfer.store, cache, store_jobs))
            best["retrieve"] = min(best["retrieve"], await _timed(transfer.retrieve, cache, retrieve_jobs))
            for name, copy, dst, src in (
                ("d2h", driver.cuMemcpyDtoHAsync, arena.data_ptr(), reference),
                ("h2d", driver.cuMemcpyHtoDAsync, reference, arena.data_ptr()),
            ):
                seconds = await _timed(
                    trio.to_thread.run_sync, _raw_copy, transfer, args.device, stream, copy, dst, src, total
                )
                best[name] = min(best[name], seconds)
        verified = await _verify(transfer, cache, specs, host_copies, store_jobs, jobs(targets, check), arena)
        del cache
    finally:
        device.activate()
        for pointer in pointers:
            call(driver.cuMemFree, pointer)
        call(driver.cuStreamDestroy, stream)
    gbps = {name: total / seconds / 1e9 for name, seconds in best.items()}
    return LayoutResult(
        layout=layout,
        piece_bytes=min(
            s.piece_bytes for s in plan_layout(specs[:1], BLOCK_TOKENS, _nbytes(specs[0])).segments
        ),
        pieces_per_round=pieces,
        store_gbps=gbps["store"],
        retrieve_gbps=gbps["retrieve"],
        memcpy_d2h_gbps=gbps["d2h"],
        memcpy_h2d_gbps=gbps["h2d"],
        store_ratio=gbps["store"] / gbps["d2h"],
        retrieve_ratio=gbps["retrieve"] / gbps["h2d"],
        verified=verified,
    )


async def _verify(
    transfer: CudaTransfer,
    cache: Any,
    specs: list[TensorSpec],
    host_copies: list[np.ndarray],
    store_jobs: list[CopyJob],
    check_jobs: list[CopyJob],
    arena: torch.Tensor,
) -> bool:
    """The first store equals the CPU path's gather of the same bytes; blocks retrieved from it,
    stored again, equal it too."""
    await transfer.store(cache, store_jobs)
    region = torch.from_numpy(np.concatenate(host_copies))
    offsets = np.concatenate(([0], np.cumsum([len(h) for h in host_copies[:-1]]))).tolist()
    host_specs = [
        TensorSpec(int(o), s.dtype, s.shape, s.strides, s.block_dim) for s, o in zip(specs, offsets)
    ]
    host_cache = MappedKVCache(plan_layout(host_specs, BLOCK_TOKENS, region.numel()), region)
    expected = torch.empty_like(arena[: sum(j.buffer.numel() for j in store_jobs)])
    cursor = 0
    expected_jobs = []
    for job in store_jobs:
        expected_jobs.append(CopyJob(job.block_ids, expected[cursor : cursor + job.buffer.numel()]))
        cursor += job.buffer.numel()
    host_cache.gather(expected_jobs)
    stored = torch.cat([job.buffer for job in store_jobs])
    if not torch.equal(stored, expected):
        raise BenchFailed("stored chunks differ from the device blocks they were copied from")
    await transfer.store(cache, check_jobs)  # the blocks the timed retrieves wrote
    if not torch.equal(torch.cat([job.buffer for job in check_jobs]), stored):
        raise BenchFailed("retrieved blocks differ from the chunks they were retrieved from")
    return True


async def run_gpu(args: argparse.Namespace) -> GpuBenchResult:
    transfer = CudaTransfer()
    if not 0 <= args.device < len(transfer.devices):
        raise BenchFailed(f"--device {args.device}: this host has {len(transfer.devices)} CUDA devices")
    blocks_per_chunk = CHUNK_TOKENS // BLOCK_TOKENS
    chunk_bytes = 2 * args.layers * BLOCK_TOKENS * KV_HEADS * HEAD_SIZE * ELEMENT_BYTES * blocks_per_chunk
    arena = torch.empty(2 * args.chunks * chunk_bytes, dtype=torch.uint8)
    transfer.pin_host(arena)
    half = args.chunks * chunk_bytes
    results = []
    for layout in LAYOUTS:
        refs.progress(f"bench gpu: {layout} layout, {args.rounds} rounds")
        results.append(await _bench_layout(transfer, layout, args, arena[:half], arena[half:]))
    return GpuBenchResult(
        device=args.device,
        chunks=args.chunks,
        chunk_bytes=chunk_bytes,
        layers=args.layers,
        rounds=args.rounds,
        target_ratio=TARGET_RATIO,
        layouts=results,
    )


def _table(result: GpuBenchResult) -> str:
    lines = [
        f"trio-kv bench gpu: device {result.device}, {result.chunks} chunks of "
        f"{result.chunk_bytes / 2**20:g} MiB ({result.layers} layers), best of {result.rounds} rounds"
    ]
    for r in result.layouts:
        lines.append(
            f"  {r.layout:<12} {r.piece_bytes // 1024} KiB pieces, {r.pieces_per_round} copies per round"
        )
        for label, gbps, ratio, reference in (
            ("store", r.store_gbps, r.store_ratio, r.memcpy_d2h_gbps),
            ("retrieve", r.retrieve_gbps, r.retrieve_ratio, r.memcpy_h2d_gbps),
        ):
            verdict = "ok" if ratio >= result.target_ratio else "MISSED"
            lines.append(
                f"    {label:<9}{gbps:8.2f} GB/s  {ratio:5.2f}x pinned memcpy ({reference:.2f} GB/s)  "
                f"target >= {result.target_ratio}x: {verdict}"
            )
        lines.append(f"    verified: {r.verified}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``trio-kv bench gpu``; returns the exit status (2 without a usable GPU)."""
    if bad_counts("gpu", args, ("chunks", "rounds", "layers")):
        return 2
    reason = driver_status()
    if reason is not None:
        print(f"trio-kv bench gpu: needs a CUDA device: {reason}", file=sys.stderr)
        return 2
    result = run_or_fail("gpu", run_gpu, args)
    if result is None:
        return 1
    emit(result, args.json, _table)
    return 0
