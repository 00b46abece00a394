"""``trio-kv bench cpu``: the CPU path measured against references taken in the same run.

The server is ``trio-kv serve`` in a process of its own; the bench is its client. Store and
retrieve move chunks of Llama-3-8B's KV shape (per layer: 2 x block x 16 tokens x 8 heads x
128, bf16) between a shared-memory KV cache and the server, one request in flight; their
reference is a ``memmove`` of the same bytes split over the server's ``copy_threads``
threads. Lookups (a 16-chunk hit) are timed against a blocking pynng Rep0 echo server,
also a process of its own, of a message as large as the encoded Lookup: one client
alternating the two (p50, p99), then 16 client processes against each (throughput, and the
server's CPU time per lookup); the same again with token ids the client packed beforehand, as
the vLLM connector sends them (informational). Also measured: the server's event-loop lag p99 while it
stores and retrieves, Python bytes L1 keeps per cached chunk, and, when ``redis-server`` is
on PATH, 16 clients asking it ``EXISTS`` of 16 client-hashed keys.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile

import msgspec
import torch

from ..client import BlockingClient
from ..errors import TrioKVError
from ..export.shm import create_shared_kv_cache
from ..keys import RequestKey, pack_tokens, packed_key
from ..nt_stores import active_threshold
from ..transfer.layout import plan_layout
from . import bench_refs as refs
from .bench_cpu_copies import BLOCK_TOKENS, CHUNK_TOKENS, INSTANCE, MODEL, copy_rounds
from .bench_memcpy import chunk_runs
from .bench_metadata import metadata_bytes_per_chunk
from .common import BenchFailed, bad_counts, emit

KV_HEADS = 8
HEAD_SIZE = 128
LAG_METRIC = "trio_kv_event_loop_lag_seconds"
# The targets on a 2-core machine (docs/benchmarks.md#targets).
TARGETS = {
    "store_ratio": (">=", 0.9),
    "retrieve_ratio": (">=", 0.9),
    "lookup_ratio": ("<=", 1.2),
    "lookup_p99_ratio": ("<=", 1.5),
    "lookup_16_throughput_ratio": (">=", 0.8),
    "redis_throughput_ratio": (">=", 1.0),
    "server_cpu_us_per_lookup": ("<=", 120.0),
    "loop_lag_p99_ms": ("<", 2.0),
    "metadata_bytes_per_chunk": ("<=", 300.0),
}


class CpuBenchResult(msgspec.Struct):
    store_gbps: float
    retrieve_gbps: float
    memcpy_gbps: float  # memmove of the same bytes (distinct chunks) on memcpy_threads threads
    store_ratio: float
    retrieve_ratio: float
    lookup_p50_us: float
    lookup_p99_us: float
    nng_echo_p50_us: float
    nng_echo_p99_us: float
    lookup_ratio: float  # lookup p50 / echo p50, one client, server and echo in their own processes
    verified: bool
    chunk_bytes: int
    chunks: int
    prompt_chunks: int
    layers: int
    rounds: int
    lookups: int
    lookup_message_bytes: int
    plain_file: bool = False  # a plain /dev/shm file, not a sealed memfd
    memcpy_threads: int = 1
    lookup_chunks: int = 16
    lookup_p99_ratio: float = 0.0
    clients: int = 16
    lookup_16_throughput: float = 0.0  # lookups/s from `clients` processes
    echo_16_throughput: float = 0.0  # echo round trips/s from as many processes
    lookup_16_throughput_ratio: float = 0.0
    server_cpu_us_per_lookup: float = 0.0  # server process CPU (all threads) per lookup under load
    echo_cpu_us_per_round_trip: float = 0.0
    loop_lag_p99_ms: float = 0.0  # the server's event-loop lag p99 while storing and retrieving
    metadata_bytes_per_chunk: float = 0.0
    memcpy_hot_gbps: float = 0.0  # one chunk memmoved `chunks` times: in cache, not the reference
    redis_throughput: float | None = None  # EXISTS x16 per second, when redis-server is on PATH
    redis_throughput_ratio: float | None = None
    # The same lookups with the token ids packed by the caller (as the vLLM connector does,
    # once per request): informational, the targets apply to the figures above.
    lookup_packed_p50_us: float = 0.0
    lookup_packed_ratio: float = 0.0
    lookup_16_packed_throughput_ratio: float = 0.0
    # glibc's non-temporal threshold the server and the memmove reference both ran with (bytes;
    # 0: glibc's default). `trio-kv bench cpu` sets what `trio-kv serve` would (nt_stores).
    copy_nt_threshold: int = 0
    # A memmove of the very runs a store copies (one call per segment's run of blocks, out of the
    # engine's region), on memcpy_threads threads: memcpy_gbps / this is what the layout's piece
    # size costs, store_gbps / this what the server costs on top (informational, no target);
    # the retrieve's own runs the other way (into the region) for retrieve_pieces_ratio.
    memcpy_pieces_gbps: float = 0.0
    memcpy_pieces_retrieve_gbps: float = 0.0
    store_pieces_ratio: float = 0.0
    retrieve_pieces_ratio: float = 0.0
    pieces_per_chunk: int = 0
    missed: list[str] = msgspec.field(default_factory=list)  # figures that miss their target


def _missed(result: CpuBenchResult) -> list[str]:
    missed = []
    for name, (op, target) in TARGETS.items():
        value = getattr(result, name)
        if value is None:
            continue
        ok = value >= target if op == ">=" else value <= target if op == "<=" else value < target
        if not ok:
            missed.append(name)
    return missed


def run_cpu(args: argparse.Namespace) -> CpuBenchResult:
    """Run the whole CPU benchmark: a server process, an echo process, client processes."""
    blocks_per_chunk = CHUNK_TOKENS // BLOCK_TOKENS
    chunk_bytes = 2 * args.layers * BLOCK_TOKENS * KV_HEADS * HEAD_SIZE * 2 * blocks_per_chunk
    source_blocks = max(args.chunks, args.lookup_chunks) * blocks_per_chunk
    # Room for a round's chunks and the lookup prompt below the 0.90 low watermark.
    l1_size = (args.chunks + args.lookup_chunks) * chunk_bytes * 5 // 4 + 2 * chunk_bytes
    env = {
        "TRIO_KV_L1_SIZE": str(l1_size),
        "TRIO_KV_CHUNK_SIZE": str(CHUNK_TOKENS),
        "TRIO_KV_COPY_THREADS": str(args.copy_threads),
        "TRIO_KV_TRANSFER": "cpu",
        "TRIO_KV_LOOP_LAG_PROBE_S": "0.002",
    }
    admin = refs.free_port()
    with (
        tempfile.TemporaryDirectory(prefix="trio-kv-bench-") as directory,
        create_shared_kv_cache(
            num_blocks=source_blocks + args.chunks * blocks_per_chunk,
            block_size=BLOCK_TOKENS,
            num_layers=args.layers,
            num_kv_heads=KV_HEADS,
            head_size=HEAD_SIZE,
            dtype=torch.bfloat16,
            layout="per_layer",
            sealed=not getattr(args, "plain_file", False),
        ) as kv,
    ):
        url, echo_url = f"ipc://{directory}/kv.sock", f"ipc://{directory}/echo.sock"
        refs.progress("bench cpu: starting trio-kv serve and the echo server")
        with refs.serve(url, admin_port=admin, env=env) as server, refs.echo_server(echo_url) as echo_pid:
            with BlockingClient.connect(url) as client:
                registered = client.register_kv_cache(INSTANCE, kv)
                if registered.block_bytes * blocks_per_chunk != chunk_bytes:
                    raise BenchFailed(f"server sees {registered.block_bytes} bytes per block")
                lag_before = refs.histogram_counts(refs.admin_text(admin, "/metrics"), LAG_METRIC)
                layout = plan_layout(kv.specs, BLOCK_TOKENS, kv.nbytes)
                runs, back = (
                    [
                        chunk_runs(layout, first + i * blocks_per_chunk, blocks_per_chunk)
                        for i in range(args.chunks)
                    ]
                    for first in (0, source_blocks)
                )
                times = copy_rounds(client, args, chunk_bytes, source_blocks, (kv.region, runs, back))
                lag_after = refs.histogram_counts(refs.admin_text(admin, "/metrics"), LAG_METRIC)
                verified = all(
                    kv.block_bytes(block) == kv.block_bytes(source_blocks + block)
                    for block in range(args.chunks * blocks_per_chunk)
                )
                if not verified:
                    raise BenchFailed("retrieved blocks differ from the stored ones")
                rng = random.Random(0x1007)
                tokens = refs.token_ids(rng, args.lookup_chunks * CHUNK_TOKENS)
                key = RequestKey(MODEL, 1, 0, tokens, request_id="bench-lookup")
                stored = client.store(INSTANCE, key, list(range(args.lookup_chunks * blocks_per_chunk)))
                if stored.stored + stored.skipped_present != args.lookup_chunks:
                    raise BenchFailed(f"the lookup prompt was not stored: {stored}")
                lookup_key = msgspec.structs.replace(key, rank=None)
                # What the vLLM connector sends: ids packed once per request, not per lookup.
                packed_lookup_key = packed_key(lookup_key)
                refs.progress(f"bench cpu: {args.lookups} lookups x2, alternating with echoes")
                (lookups, packed_lookups), echoes = refs.latency_samples(
                    client,
                    [lookup_key, packed_lookup_key],
                    echo_url,
                    args.lookups,
                    warmup=max(20, args.lookups // 10),
                )
                client.end_session(lookup_key.request_id)
            payload = refs.echo_payload(lookup_key)

            def load(op: str, label: str, op_args: tuple[object, ...], pid: int) -> tuple[float, float]:
                refs.progress(f"bench cpu: {args.clients} {label} clients for {args.load_seconds} s")
                return refs.run_load(
                    op, op_args, clients=args.clients, seconds=args.load_seconds, server_pid=pid
                )

            lookup_rate, server_cpu = load("lookup", "lookup", (url, lookup_key), server.pid)
            packed_rate, _ = load("lookup", "packed-key lookup", (url, packed_lookup_key), server.pid)
            echo_rate, echo_cpu = load("echo", "echo", (echo_url, payload), echo_pid)
            redis_rate = None
            if refs.redis_path() is not None:
                with refs.redis_server(directory) as (path, redis_pid):
                    packed = pack_tokens(tokens)
                    refs.RedisExists(path, packed, CHUNK_TOKENS * 4).set_all()
                    redis_rate, _ = load("redis", "redis", (path, packed, CHUNK_TOKENS * 4), redis_pid)
    refs.progress(f"bench cpu: L1 metadata of {args.metadata_chunks} chunks")
    metadata = metadata_bytes_per_chunk(args.metadata_chunks)
    total_bytes = args.chunks * chunk_bytes
    store_gbps, retrieve_gbps, memcpy_gbps, hot_gbps, pieces_gbps, back_gbps = (
        total_bytes / s / 1e9 for s in times
    )
    lookup_p50, echo_p50 = refs.percentile_us(lookups, 0.5), refs.percentile_us(echoes, 0.5)
    lookup_p99, echo_p99 = refs.percentile_us(lookups, 0.99), refs.percentile_us(echoes, 0.99)
    result = CpuBenchResult(
        store_gbps=store_gbps,
        retrieve_gbps=retrieve_gbps,
        memcpy_gbps=memcpy_gbps,
        memcpy_hot_gbps=hot_gbps,
        memcpy_pieces_gbps=pieces_gbps,
        memcpy_pieces_retrieve_gbps=back_gbps,
        store_pieces_ratio=store_gbps / pieces_gbps,
        retrieve_pieces_ratio=retrieve_gbps / back_gbps,
        pieces_per_chunk=len(runs[0]),
        store_ratio=store_gbps / memcpy_gbps,
        retrieve_ratio=retrieve_gbps / memcpy_gbps,
        lookup_p50_us=lookup_p50,
        lookup_p99_us=lookup_p99,
        nng_echo_p50_us=echo_p50,
        nng_echo_p99_us=echo_p99,
        lookup_ratio=lookup_p50 / echo_p50,
        lookup_packed_p50_us=refs.percentile_us(packed_lookups, 0.5),
        lookup_packed_ratio=refs.percentile_us(packed_lookups, 0.5) / echo_p50,
        lookup_16_packed_throughput_ratio=packed_rate / echo_rate,
        verified=verified,
        chunk_bytes=chunk_bytes,
        chunks=args.chunks,
        prompt_chunks=args.prompt_chunks,
        layers=args.layers,
        rounds=args.rounds,
        lookups=args.lookups,
        lookup_message_bytes=len(payload),
        plain_file=kv.sealed is None,
        memcpy_threads=args.copy_threads,
        copy_nt_threshold=active_threshold(),
        lookup_chunks=args.lookup_chunks,
        lookup_p99_ratio=lookup_p99 / echo_p99,
        clients=args.clients,
        lookup_16_throughput=lookup_rate,
        echo_16_throughput=echo_rate,
        lookup_16_throughput_ratio=lookup_rate / echo_rate,
        server_cpu_us_per_lookup=server_cpu,
        echo_cpu_us_per_round_trip=echo_cpu,
        loop_lag_p99_ms=refs.histogram_quantile(lag_before, lag_after, 0.99) * 1000,
        metadata_bytes_per_chunk=metadata,
        redis_throughput=redis_rate,
        redis_throughput_ratio=None if redis_rate is None else lookup_rate / redis_rate,
    )
    result.missed = _missed(result)
    return result


def _table(r: CpuBenchResult) -> str:
    """A short readable summary: figures, ratios and their targets."""

    def verdict(name: str) -> str:
        op, target = TARGETS[name]
        return f"target {op} {target:g}: " + ("MISSED" if name in r.missed else "ok")

    redis = (
        f"  redis     {r.redis_throughput:8.0f} EXISTS x{r.lookup_chunks}/s  trio-kv {r.redis_throughput_ratio:.2f}x  "
        + verdict("redis_throughput_ratio")
        if r.redis_throughput is not None and r.redis_throughput_ratio is not None
        else "  redis     (redis-server not on PATH: not measured)"
    )
    return "\n".join(
        [
            f"trio-kv bench cpu: {r.chunks} chunks of {r.chunk_bytes / 2**20:g} MiB ({r.layers} layers"
            + (", plain file), " if r.plain_file else "), ")
            + f"{r.prompt_chunks} per request, best of {r.rounds} rounds after a warm-up; "
            + f"{r.lookups} lookups of a {r.lookup_chunks}-chunk prompt; {r.clients} client processes",
            f"  memcpy    {r.memcpy_gbps:8.2f} GB/s on {r.memcpy_threads} threads, {r.chunks} distinct chunks "
            f"(one chunk {r.chunks} times, in cache: {r.memcpy_hot_gbps:.2f} GB/s); "
            + (
                f"copies of {r.copy_nt_threshold} bytes or more stream past the caches"
                if r.copy_nt_threshold
                else "glibc's default streaming threshold"
            ),
            f"  pieces    {r.memcpy_pieces_gbps:8.2f} / {r.memcpy_pieces_retrieve_gbps:.2f} GB/s memmove of the store's / "
            f"retrieve's own {r.pieces_per_chunk} runs per chunk ({r.chunk_bytes // max(1, r.pieces_per_chunk) >> 10} "
            f"KiB each): store {r.store_pieces_ratio:.2f}x, retrieve {r.retrieve_pieces_ratio:.2f}x (informational)",
            f"  store     {r.store_gbps:8.2f} GB/s  {r.store_ratio:5.2f}x  " + verdict("store_ratio"),
            f"  retrieve  {r.retrieve_gbps:8.2f} GB/s  {r.retrieve_ratio:5.2f}x  "
            + verdict("retrieve_ratio"),
            f"  nng echo  {r.nng_echo_p50_us:8.1f} us p50 (p99 {r.nng_echo_p99_us:.0f} us), "
            f"{r.lookup_message_bytes}-byte message, {r.echo_16_throughput:.0f}/s from {r.clients} clients",
            f"  lookup    {r.lookup_p50_us:8.1f} us p50  {r.lookup_ratio:5.2f}x  " + verdict("lookup_ratio"),
            f"            {r.lookup_p99_us:8.1f} us p99  {r.lookup_p99_ratio:5.2f}x  "
            + verdict("lookup_p99_ratio"),
            f"            {r.lookup_16_throughput:8.0f} /s      {r.lookup_16_throughput_ratio:5.2f}x  "
            + verdict("lookup_16_throughput_ratio"),
            f"  packed    {r.lookup_packed_p50_us:8.1f} us p50  {r.lookup_packed_ratio:5.2f}x, "
            f"{r.lookup_16_packed_throughput_ratio:.2f}x throughput (ids packed by the caller, as the connector does)",
            f"  server    {r.server_cpu_us_per_lookup:8.0f} us CPU per lookup (echo {r.echo_cpu_us_per_round_trip:.0f})  "
            + verdict("server_cpu_us_per_lookup"),
            f"  loop lag  {r.loop_lag_p99_ms:8.2f} ms p99 while storing  " + verdict("loop_lag_p99_ms"),
            f"  metadata  {r.metadata_bytes_per_chunk:8.0f} B per L1 chunk  "
            + verdict("metadata_bytes_per_chunk"),
            redis,
            f"  retrieved blocks equal stored blocks: {r.verified}",
        ]
    )


def main(args: argparse.Namespace) -> int:
    """``trio-kv bench cpu``; returns the exit status (1 if the system under test failed)."""
    names = (
        "chunks",
        "prompt_chunks",
        "rounds",
        "layers",
        "lookups",
        "lookup_chunks",
        "clients",
        "copy_threads",
        "metadata_chunks",
    )
    if bad_counts("cpu", args, names):
        return 2
    if args.load_seconds <= 0:
        print("trio-kv bench cpu: --load-seconds must be > 0", file=sys.stderr)
        return 2
    try:
        result = run_cpu(args)
    except (BenchFailed, TrioKVError) as exc:
        print(f"trio-kv bench cpu: FAILED: {exc}", file=sys.stderr)
        return 1
    emit(result, args.json, _table)
    return 0
