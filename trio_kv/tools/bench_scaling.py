"""``trio-kv bench scaling``: how the hot path scales, each row against a reference of the same run.

Three tables, with ``trio-kv serve`` and the references in processes of their own
(``bench_refs``):

- **chunk size** 256 KiB -> 64 MiB: store and retrieve GB/s of one request of 4 chunks, vs a
  ``memmove`` of the same bytes (4 distinct chunks) on the server's copy threads. One server holds a KV cache per
  size (256-token chunks; the size set by the layer and head counts).
- **clients** 1, 4, 16 processes: lookups/s of a 16-chunk prompt vs echo round trips/s of a
  message as large, and the server's CPU time per lookup.
- **cached chunks** 10^3 -> ``--max-cached`` (10^6): lookup p50 of a 16-chunk prompt while L1
  holds that many chunks (16-token chunks of 1 KiB, 4 KiB in the arena), vs the echo's p50.

``--markdown`` prints the tables as README's "Scaling" section prints them.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import torch

from ..client import BlockingClient
from ..export.shm import SharedKVCache, create_shared_kv_cache
from ..keys import RequestKey
from . import bench_refs as refs
from .bench_memcpy import chunk_buffers, memcpy_seconds
from .common import BenchFailed, emit

SIZES = [(256 * 1024, 1, 2), (1 << 20, 1, 8), (4 << 20, 4, 8), (16 << 20, 16, 8), (64 << 20, 64, 8)]
CLIENTS = (1, 4, 16)


class SizeRow(msgspec.Struct):
    chunk_bytes: int
    store_gbps: float
    retrieve_gbps: float
    memcpy_gbps: float
    store_ratio: float
    retrieve_ratio: float


class ClientsRow(msgspec.Struct):
    clients: int
    lookups_per_s: float
    echo_per_s: float
    ratio: float
    server_cpu_us_per_lookup: float


class CachedRow(msgspec.Struct):
    cached_chunks: int
    lookup_p50_us: float
    echo_p50_us: float
    ratio: float


class ScalingResult(msgspec.Struct):
    sizes: list[SizeRow]
    clients: list[ClientsRow]
    cached: list[CachedRow]


def add_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = bench_subparsers.add_parser(
        "scaling",
        help="throughput vs chunk size and clients, lookup cost vs cached chunks",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--max-cached", type=int, default=1_000_000, help="largest L1 fill (default 10^6)")
    parser.add_argument(
        "--load-seconds", type=float, default=2.0, help="seconds per throughput row (default 2)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per chunk size, best kept (default 3)")
    return parser


def _kv(chunk_bytes: int, layers: int, heads: int, blocks: int = 128) -> SharedKVCache:
    head_size = chunk_bytes // (layers * 2 * 256 * heads * 2)
    return create_shared_kv_cache(
        num_blocks=blocks, block_size=16, num_layers=layers, num_kv_heads=heads, head_size=head_size,
        dtype=torch.bfloat16, layout="per_layer",
    )  # fmt: skip


def _sizes(client: BlockingClient, rounds: int) -> list[SizeRow]:
    rows, rng = [], random.Random(5)
    with ThreadPoolExecutor(2) as pool:
        for chunk_bytes, layers, heads in SIZES:
            refs.progress(f"bench scaling: {chunk_bytes >> 10} KiB chunks")
            with _kv(chunk_bytes, layers, heads) as kv:
                name = f"size-{chunk_bytes}"
                client.register_kv_cache(name, kv)
                sources, targets = chunk_buffers(4, chunk_bytes)
                best = [float("inf")] * 3
                for round_index in range(rounds + 1):  # round 0 warms up
                    client.clear("")
                    key = RequestKey("scaling", 1, 0, refs.token_ids(rng, 4 * 256))
                    start = time.perf_counter()
                    if client.store(name, key, list(range(64))).stored != 4:
                        raise BenchFailed(f"store of 4 {chunk_bytes}-byte chunks failed")
                    store_s = time.perf_counter() - start
                    start = time.perf_counter()
                    if client.retrieve(name, key, list(range(64, 128))).chunks_written != 4:
                        raise BenchFailed(f"retrieve of 4 {chunk_bytes}-byte chunks failed")
                    retrieve_s = time.perf_counter() - start
                    memcpy_s = memcpy_seconds(pool, 2, sources, targets)
                    if round_index:
                        best = [min(b, s) for b, s in zip(best, (store_s, retrieve_s, memcpy_s), strict=True)]
                client.unregister(name)
            store, retrieve, memcpy = (4 * chunk_bytes / s / 1e9 for s in best)
            rows.append(SizeRow(chunk_bytes, store, retrieve, memcpy, store / memcpy, retrieve / memcpy))
    return rows


def _lookup_key(client: BlockingClient, instance: str, chunk_tokens: int, first: int) -> RequestKey:
    """Store a 16-chunk prompt and return its lookup key (every rank, a request id)."""
    key = RequestKey(
        "scaling", 1, 0, list(range(first, first + 16 * chunk_tokens)), request_id="scaling-lookup"
    )
    blocks = list(range(16 * chunk_tokens // 16))
    stored = client.store(instance, key, blocks)
    if stored.stored + stored.skipped_present != 16:
        raise BenchFailed(f"the lookup prompt was not stored: {stored}")
    return msgspec.structs.replace(key, rank=None)


def _clients(
    url: str, echo_url: str, server_pid: int, echo_pid: int, key: RequestKey, seconds: float
) -> list[ClientsRow]:
    payload = refs.echo_payload(key)
    rows = []
    for clients in CLIENTS:
        refs.progress(f"bench scaling: {clients} client processes")
        rate, cpu = refs.run_load(
            "lookup", (url, key), clients=clients, seconds=seconds, server_pid=server_pid
        )
        echo, _ = refs.run_load(
            "echo", (echo_url, payload), clients=clients, seconds=seconds, server_pid=echo_pid
        )
        rows.append(ClientsRow(clients, rate, echo, rate / echo, cpu))
    return rows


def _p50s(client: BlockingClient, key: RequestKey, echo_url: str, count: int = 400) -> tuple[float, float]:
    (lookups,), echoes = refs.latency_samples(client, [key], echo_url, count, warmup=50)
    return refs.percentile_us(lookups, 0.5), refs.percentile_us(echoes, 0.5)


def _cached(directory: str, echo_url: str, max_cached: int) -> list[CachedRow]:
    """Fill an L1 of 16-token, 1 KiB chunks step by step; time a 16-chunk lookup at each step."""
    url, rows = f"ipc://{directory}/fill.sock", []
    env = {"TRIO_KV_CHUNK_SIZE": "16", "TRIO_KV_L1_SIZE": str((max_cached + 64) * 4096 * 100 // 94),
           "TRIO_KV_TRANSFER": "cpu", "TRIO_KV_MAX_SESSIONS": "1024"}  # fmt: skip
    steps = [10**k for k in range(3, 7) if 10**k <= max_cached] or [max_cached]
    with (
        refs.serve(url, admin_port=refs.free_port(), env=env),
        create_shared_kv_cache(
            num_blocks=256, block_size=16, num_layers=1, num_kv_heads=1, head_size=16
        ) as kv,
        BlockingClient.connect(url) as client,
    ):
        client.register_kv_cache("fill", kv)
        key = _lookup_key(client, "fill", 16, 0)
        cached, rng = 16, random.Random(9)
        for step in steps:
            refs.progress(f"bench scaling: filling L1 to {step} chunks")
            while cached < step:
                n = min(256, step - cached)
                filler = RequestKey("fill", 1, 0, refs.token_ids(rng, n * 16))
                cached += client.store("fill", filler, list(range(n))).stored
            lookup, echo = _p50s(client, key, echo_url)
            rows.append(CachedRow(cached, lookup, echo, lookup / echo))
    return rows


def run_scaling(args: argparse.Namespace) -> ScalingResult:
    with tempfile.TemporaryDirectory(prefix="trio-kv-scaling-") as directory:
        url, echo_url = f"ipc://{directory}/kv.sock", f"ipc://{directory}/echo.sock"
        env = {"TRIO_KV_L1_SIZE": str(6 * (64 << 20)), "TRIO_KV_TRANSFER": "cpu", "TRIO_KV_COPY_THREADS": "2"}
        with refs.echo_server(echo_url) as echo_pid:
            with (
                refs.serve(url, admin_port=refs.free_port(), env=env) as server,
                BlockingClient.connect(url) as client,
            ):
                sizes = _sizes(client, args.rounds)
                client.clear("")
                with _kv(1 << 20, 1, 8, blocks=256) as kv:
                    client.register_kv_cache("lookup", kv)
                    key = _lookup_key(client, "lookup", 256, 10**6)
                    clients = _clients(url, echo_url, server.pid, echo_pid, key, args.load_seconds)
            cached = _cached(directory, echo_url, args.max_cached)
    return ScalingResult(sizes, clients, cached)


def markdown(r: ScalingResult) -> str:
    lines = [
        "| chunk | store GB/s | retrieve GB/s | memmove GB/s (2 threads) | store ratio | retrieve ratio |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.chunk_bytes >> 10} KiB | {s.store_gbps:.2f} | {s.retrieve_gbps:.2f} | {s.memcpy_gbps:.2f} | "
        f"{s.store_ratio:.2f} | {s.retrieve_ratio:.2f} |"
        for s in r.sizes
    ]
    lines += [
        "",
        "| client processes | lookups/s | echo round trips/s | ratio | server CPU µs per lookup |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c.clients} | {c.lookups_per_s:.0f} | {c.echo_per_s:.0f} | {c.ratio:.2f} | {c.server_cpu_us_per_lookup:.0f} |"
        for c in r.clients
    ]
    lines += ["", "| cached chunks | lookup p50 µs | echo p50 µs | ratio |", "|---|---|---|---|"]
    lines += [
        f"| {c.cached_chunks} | {c.lookup_p50_us:.0f} | {c.echo_p50_us:.0f} | {c.ratio:.2f} |"
        for c in r.cached
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.max_cached < 1000 or args.rounds < 1 or args.load_seconds <= 0:
        print(
            "trio-kv bench scaling: needs --max-cached >= 1000, --rounds >= 1, --load-seconds > 0",
            file=sys.stderr,
        )
        return 2
    try:
        result = run_scaling(args)
    except BenchFailed as exc:
        print(f"trio-kv bench scaling: FAILED: {exc}", file=sys.stderr)
        return 1
    if args.markdown:
        print(markdown(result))
    else:
        emit(result, args.json, markdown)
    return 0
