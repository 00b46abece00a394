"""``trio-kv bench cpu``: the CPU path measured against references taken in the same run.

Store and retrieve move chunks of Llama-3-8B's KV shape (per layer: 2 x block x
16 tokens x 8 heads x 128, bf16) between a shared-memory KV cache and an
in-process server, through the client, one request in flight. The references
are a plain ``memmove`` of the same bytes and a raw pynng Req/Rep echo of a
message as large as the encoded Lookup request, so the ratios say what the
server costs over the memory bus and the transport themselves.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import random
import tempfile
import time
from collections.abc import Sequence

import msgspec
import pynng
import torch
import trio

from ..client import AsyncClient
from ..errors import TrioKVError
from ..export.shm import create_shared_kv_cache
from ..keys import RequestKey, packed_key
from ..protocol import Lookup, encode
from ..testing import running_server
from .common import BenchFailed, bad_counts, emit, run_or_fail

CHUNK_TOKENS = 256
BLOCK_TOKENS = 16
KV_HEADS = 8
HEAD_SIZE = 128
INSTANCE = "bench"
MODEL = "bench/llama-3-8b"
TARGET_COPY_RATIO = 0.7
TARGET_LOOKUP_RATIO = 1.5


class CpuBenchResult(msgspec.Struct):
    store_gbps: float
    retrieve_gbps: float
    memcpy_gbps: float
    store_ratio: float
    retrieve_ratio: float
    lookup_p50_us: float
    lookup_p99_us: float
    nng_echo_p50_us: float
    nng_echo_p99_us: float
    lookup_ratio: float
    verified: bool
    chunk_bytes: int
    chunks: int
    prompt_chunks: int
    layers: int
    rounds: int
    lookups: int
    lookup_message_bytes: int
    plain_file: bool = False  # a plain /dev/shm file, not a sealed memfd


def _percentile_us(samples_ns: Sequence[int], fraction: float) -> float:
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


def _memcpy_seconds(chunks: int, chunk_bytes: int, source: torch.Tensor, target: torch.Tensor) -> float:
    """Copy one chunk ``chunks`` times with memmove; blocking (run in a thread)."""
    start = time.perf_counter()
    for _ in range(chunks):
        ctypes.memmove(target.data_ptr(), source.data_ptr(), chunk_bytes)
    return time.perf_counter() - start


async def _copy_rounds(
    client: AsyncClient, args: argparse.Namespace, chunk_bytes: int
) -> tuple[float, float, float, RequestKey]:
    """Best-of-rounds (store, retrieve, memcpy) seconds, and one stored prompt's key.

    One untimed warm-up round runs first: the first copies into fresh L1 memory fault its pages
    in, which made a lone cold round (``--rounds 1``) read as a 25x miss of the target."""
    rng = random.Random(0x7210)
    blocks_per_chunk = CHUNK_TOKENS // BLOCK_TOKENS
    target_block0 = args.chunks * blocks_per_chunk
    # (chunks, source blocks) per prompt: full prompts of --prompt-chunks, then the rest.
    spans = [
        (n, range(first * blocks_per_chunk, (first + n) * blocks_per_chunk))
        for first in range(0, args.chunks, args.prompt_chunks)
        for n in [min(args.prompt_chunks, args.chunks - first)]
    ]
    # Written once so every page is faulted in before the first timed copy.
    memcpy_source = torch.full((chunk_bytes,), 1, dtype=torch.uint8)
    memcpy_target = torch.zeros(chunk_bytes, dtype=torch.uint8)
    best_store = best_retrieve = best_memcpy = math.inf
    keys: list[RequestKey] = []
    for round_index in range(1 + args.rounds):  # round 0 is the warm-up
        await client.clear("")  # the bench's prompts carry no salt
        # Fresh token ids each round: every store is a miss that copies.
        keys = [
            RequestKey(MODEL, 1, 0, [rng.randrange(2**32) for _ in range(n * CHUNK_TOKENS)]) for n, _ in spans
        ]

        start = time.perf_counter()
        for key, (n, blocks) in zip(keys, spans, strict=True):
            stored = await client.store(INSTANCE, key, list(blocks))
            if stored.stored != n:
                raise BenchFailed(f"store of a {n}-chunk prompt stored only {stored}")
        store_s = time.perf_counter() - start

        start = time.perf_counter()
        for key, (n, blocks) in zip(keys, spans, strict=True):
            target = [target_block0 + block for block in blocks]
            retrieved = await client.retrieve(INSTANCE, key, target)
            if retrieved.chunks_written != n:
                raise BenchFailed(f"retrieve of a {n}-chunk prompt wrote only {retrieved}")
        retrieve_s = time.perf_counter() - start

        memcpy_s = await trio.to_thread.run_sync(
            _memcpy_seconds, args.chunks, chunk_bytes, memcpy_source, memcpy_target
        )
        if round_index:
            best_store = min(best_store, store_s)
            best_retrieve = min(best_retrieve, retrieve_s)
            best_memcpy = min(best_memcpy, memcpy_s)
    return best_store, best_retrieve, best_memcpy, keys[0]


async def _echo(rep: pynng.Rep0) -> None:
    """Send every message back, one at a time, until cancelled."""
    ctx = rep.new_context()
    try:
        while True:
            await ctx.asend(await ctx.arecv())
    finally:
        ctx.close()


async def _round_trip_ns(req: pynng.Req0, payload: bytes) -> int:
    start = time.perf_counter_ns()
    ctx = req.new_context()
    try:
        await ctx.asend(payload)
        await ctx.arecv()
    finally:
        ctx.close()
    return time.perf_counter_ns() - start


async def _latency_samples(
    client: AsyncClient, key: RequestKey, count: int, warmup: int
) -> tuple[list[int], list[int]]:
    """Nanoseconds per lookup of ``key`` and per raw Req0/Rep0 echo of a message as large
    as the encoded Lookup, on a temporary socket of its own. The two alternate, so
    drift in the machine hits both alike. The lookup's session is ended afterwards."""
    payload = bytes(len(encode(Lookup(packed_key(key)))))
    lookups, echoes = [], []
    with tempfile.TemporaryDirectory(prefix="trio-kv-bench-") as directory:
        url = f"ipc://{directory}/echo.sock"
        with (
            pynng.Rep0(listen=url, recv_max_size=2 * len(payload)) as rep,
            pynng.Req0(resend_time=-1) as req,
        ):
            req.dial(url, block=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_echo, rep)
                try:
                    for _ in range(warmup + count):
                        start = time.perf_counter_ns()
                        result = await client.lookup(key)
                        lookups.append(time.perf_counter_ns() - start)
                        if result.hit_tokens != len(key.tokens):
                            raise BenchFailed(f"lookup of a stored prompt found {result}")
                        echoes.append(await _round_trip_ns(req, payload))
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True):
                        await client.end_session(key.request_id)
    return lookups[warmup:], echoes[warmup:]


async def run_cpu(args: argparse.Namespace) -> CpuBenchResult:
    """Run the whole CPU benchmark in the current Trio run."""
    blocks_per_chunk = CHUNK_TOKENS // BLOCK_TOKENS
    # K and V of every layer, bf16.
    chunk_bytes = 2 * args.layers * BLOCK_TOKENS * KV_HEADS * HEAD_SIZE * 2 * blocks_per_chunk
    with create_shared_kv_cache(
        num_blocks=2 * args.chunks * blocks_per_chunk,
        block_size=BLOCK_TOKENS,
        num_layers=args.layers,
        num_kv_heads=KV_HEADS,
        head_size=HEAD_SIZE,
        dtype=torch.bfloat16,
        layout="per_layer",
        sealed=not getattr(args, "plain_file", False),
    ) as kv:
        # Room for a round's chunks below the 0.90 low watermark, so eviction never runs.
        l1_size = args.chunks * chunk_bytes * 5 // 4 + 2 * chunk_bytes
        async with (
            running_server(l1_size=l1_size, chunk_size=CHUNK_TOKENS) as server,
            await AsyncClient.connect(server.url) as client,
        ):
            registered = await client.register_kv_cache(INSTANCE, kv)
            if registered.block_bytes * blocks_per_chunk != chunk_bytes:
                raise BenchFailed(f"server sees {registered.block_bytes} bytes per block")
            store_s, retrieve_s, memcpy_s, key = await _copy_rounds(client, args, chunk_bytes)
            lookup_key = msgspec.structs.replace(key, rank=None, request_id="bench-lookup")
            lookups, echoes = await _latency_samples(client, lookup_key, args.lookups, warmup=50)
        target_block0 = args.chunks * blocks_per_chunk
        kv_sealed = kv.sealed is not None
        verified = all(
            kv.block_bytes(block) == kv.block_bytes(target_block0 + block) for block in range(target_block0)
        )
    if not verified:
        raise BenchFailed("retrieved blocks differ from the stored ones")
    total_bytes = args.chunks * chunk_bytes
    store_gbps, retrieve_gbps, memcpy_gbps = (total_bytes / s / 1e9 for s in (store_s, retrieve_s, memcpy_s))
    lookup_p50, echo_p50 = _percentile_us(lookups, 0.5), _percentile_us(echoes, 0.5)
    return CpuBenchResult(
        store_gbps=store_gbps,
        retrieve_gbps=retrieve_gbps,
        memcpy_gbps=memcpy_gbps,
        store_ratio=store_gbps / memcpy_gbps,
        retrieve_ratio=retrieve_gbps / memcpy_gbps,
        lookup_p50_us=lookup_p50,
        lookup_p99_us=_percentile_us(lookups, 0.99),
        nng_echo_p50_us=echo_p50,
        nng_echo_p99_us=_percentile_us(echoes, 0.99),
        lookup_ratio=lookup_p50 / echo_p50,
        verified=verified,
        chunk_bytes=chunk_bytes,
        chunks=args.chunks,
        prompt_chunks=args.prompt_chunks,
        layers=args.layers,
        rounds=args.rounds,
        lookups=args.lookups,
        lookup_message_bytes=len(encode(Lookup(packed_key(lookup_key)))),
        plain_file=not kv_sealed,
    )


def _table(r: CpuBenchResult) -> str:
    """A short readable summary: figures, ratios and their targets."""

    def verdict(passed: bool) -> str:
        return "ok" if passed else "MISSED"

    copy_target = f"target >= {TARGET_COPY_RATIO}x memcpy"
    return "\n".join(
        [
            f"trio-kv bench cpu: {r.chunks} chunks of {r.chunk_bytes / 2**20:g} MiB ({r.layers} layers"
            + (", plain file), " if r.plain_file else "), ")
            + f"{r.prompt_chunks} per request, best of {r.rounds} rounds after a warm-up; "
            + f"{r.lookups} lookups",
            f"  memcpy    {r.memcpy_gbps:8.2f} GB/s",
            f"  store     {r.store_gbps:8.2f} GB/s  {r.store_ratio:5.2f}x  {copy_target}: "
            + verdict(r.store_ratio >= TARGET_COPY_RATIO),
            f"  retrieve  {r.retrieve_gbps:8.2f} GB/s  {r.retrieve_ratio:5.2f}x  {copy_target}: "
            + verdict(r.retrieve_ratio >= TARGET_COPY_RATIO),
            f"  nng echo  {r.nng_echo_p50_us:8.1f} us p50 (p99 {r.nng_echo_p99_us:.0f} us), "
            f"{r.lookup_message_bytes}-byte message",
            f"  lookup    {r.lookup_p50_us:8.1f} us p50 (p99 {r.lookup_p99_us:.0f} us)  {r.lookup_ratio:5.2f}x  "
            f"target <= {TARGET_LOOKUP_RATIO}x echo: " + verdict(r.lookup_ratio <= TARGET_LOOKUP_RATIO),
            f"  retrieved blocks equal stored blocks: {r.verified}",
        ]
    )


def main(args: argparse.Namespace) -> int:
    """``trio-kv bench cpu`` (the only benchmark so far); returns the exit status."""
    if bad_counts("cpu", args, ("chunks", "prompt_chunks", "rounds", "layers", "lookups")):
        return 2
    result = run_or_fail("cpu", run_cpu, args, expected=(TrioKVError,))
    if result is None:
        return 1
    emit(result, args.json, _table)
    return 0
