"""``trio-kv bench cpu``'s copy rounds: stores and retrieves through the server, timed against
``memmove`` references of the same bytes copied in the same run (``bench_memcpy``)."""

from __future__ import annotations

import argparse
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from ..client import BlockingClient
from ..keys import RequestKey
from . import bench_refs as refs
from .bench_memcpy import Run, chunk_buffers, memcpy_seconds, pieces_seconds
from .common import BenchFailed

CHUNK_TOKENS = 256
BLOCK_TOKENS = 16
INSTANCE = "bench"
MODEL = "bench/llama-3-8b"


class CopyTimes(NamedTuple):
    """Best-of-rounds seconds of the copy figures."""

    store: float
    retrieve: float
    memcpy: float  # ``chunks`` distinct chunks, contiguous (the store's bytes, from memory)
    hot: float  # one chunk ``chunks`` times (in cache)
    pieces: float  # the store's own pieces, out of the engine's region (``pieces_seconds``)
    pieces_retrieve: float  # the retrieve's own pieces, into the region


def copy_rounds(
    client: BlockingClient,
    args: argparse.Namespace,
    chunk_bytes: int,
    target_block0: int,
    pieces: tuple[torch.Tensor, list[list[Run]], list[list[Run]]],
) -> CopyTimes:
    """Best-of-rounds copy times; round r's chunks are retrieved into the blocks from
    ``target_block0`` on. ``pieces`` is the engine's region and each chunk's runs in it, as
    stored and as retrieved.

    One untimed warm-up round runs first: the first copies into fresh L1 memory fault its
    pages in, which made a lone cold round read as a 25x miss of the target."""
    rng = random.Random(0x7210)
    blocks_per_chunk = CHUNK_TOKENS // BLOCK_TOKENS
    spans = [
        (n, range(first * blocks_per_chunk, (first + n) * blocks_per_chunk))
        for first in range(0, args.chunks, args.prompt_chunks)
        for n in [min(args.prompt_chunks, args.chunks - first)]
    ]
    sources, targets = chunk_buffers(args.chunks, chunk_bytes)  # 2 x 512 MiB for the defaults
    region, store_runs, retrieve_runs = pieces
    best = CopyTimes(*[math.inf] * len(CopyTimes._fields))
    with ThreadPoolExecutor(args.copy_threads) as pool:
        for round_index in range(1 + args.rounds):  # round 0 is the warm-up
            refs.progress(
                f"bench cpu: copy round {round_index}/{args.rounds}"
                + (" (warm-up)" if not round_index else "")
            )
            client.clear("")
            keys = [RequestKey(MODEL, 1, 0, refs.token_ids(rng, n * CHUNK_TOKENS)) for n, _ in spans]
            start = time.perf_counter()
            for key, (n, blocks) in zip(keys, spans, strict=True):
                stored = client.store(INSTANCE, key, list(blocks))
                if stored.stored != n:
                    raise BenchFailed(f"store of a {n}-chunk prompt stored only {stored}")
            store_s = time.perf_counter() - start
            start = time.perf_counter()
            for key, (n, blocks) in zip(keys, spans, strict=True):
                retrieved = client.retrieve(INSTANCE, key, [target_block0 + block for block in blocks])
                if retrieved.chunks_written != n:
                    raise BenchFailed(f"retrieve of a {n}-chunk prompt wrote only {retrieved}")
            retrieve_s = time.perf_counter() - start
            memcpy_s = memcpy_seconds(pool, args.copy_threads, sources, targets)
            hot_s = memcpy_seconds(
                pool, args.copy_threads, sources[:1] * args.chunks, targets[:1] * args.chunks
            )
            pieces_s = pieces_seconds(
                pool, args.copy_threads, region, store_runs, targets, args.prompt_chunks
            )
            # The targets now hold the stored chunks: this writes what the retrieve wrote.
            back_s = pieces_seconds(
                pool, args.copy_threads, region, retrieve_runs, targets, args.prompt_chunks, into_region=True
            )
            if round_index:
                now = CopyTimes(store_s, retrieve_s, memcpy_s, hot_s, pieces_s, back_s)
                best = CopyTimes(*map(min, best, now))
    return best
