"""The copy references of ``bench cpu`` and ``bench scaling``: ``memmove`` of chunk-sized buffers
split over as many threads as the server copies a chunk with, and (``bench cpu``) a ``memmove``
of the very pieces a store copies, which tells the layout's cost from the server's."""

from __future__ import annotations

import ctypes
import itertools
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..transfer.hugepages import advise_huge_pages
from ..transfer.layout import KVLayout

# (offset in the KV cache's region, bytes): one contiguous run of a chunk's bytes.
Run = tuple[int, int]


def memcpy_seconds(
    pool: ThreadPoolExecutor, threads: int, sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
) -> float:
    """Copy ``sources[i]`` into ``targets[i]`` one pair after the other, each copy split into
    ``threads`` memmoves run at once (ctypes releases the GIL), as the server splits a chunk
    over its copy threads. Distinct pairs stream from memory as the server's copies do; one
    pair repeated stays in cache (the ``memcpy_hot_gbps`` figure)."""
    start = time.perf_counter()
    for source, target in zip(sources, targets, strict=True):
        size = source.numel()
        src, dst = source.data_ptr(), target.data_ptr()
        bounds = [size * i // threads for i in range(threads + 1)]
        parts = [pool.submit(ctypes.memmove, dst + a, src + a, b - a) for a, b in itertools.pairwise(bounds)]
        for part in parts:
            part.result()
    return time.perf_counter() - start


def chunk_buffers(chunks: int, chunk_bytes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``chunks`` distinct chunk-sized sources and as many targets, their pages faulted in. The
    targets get huge pages as the server's L1 arena does; the sources, like an engine's
    shared memory, do not."""
    sources = torch.full((chunks, chunk_bytes), 1, dtype=torch.uint8)
    targets = torch.empty(chunks, chunk_bytes, dtype=torch.uint8)
    advise_huge_pages(targets)
    targets.zero_()
    return list(sources), list(targets)


def chunk_runs(layout: KVLayout, first_block: int, blocks: int) -> list[Run]:
    """The runs of region bytes a chunk of engine blocks ``first_block`` .. ``first_block +
    blocks - 1`` occupies, in the order L1 holds a chunk (segment after segment, each segment's
    piece of every block in order): one run per segment whose pieces of consecutive blocks are
    adjacent (a per-layer layout's K or V of one layer), else one run per block and segment."""
    runs: list[Run] = []
    for seg in layout.segments:
        start = seg.offset + first_block * seg.block_stride
        if seg.block_stride == seg.piece_bytes:
            runs.append((start, blocks * seg.piece_bytes))
        else:
            runs.extend((start + block * seg.block_stride, seg.piece_bytes) for block in range(blocks))
    return runs


def pieces_seconds(
    pool: ThreadPoolExecutor,
    threads: int,
    region: torch.Tensor,
    runs_per_chunk: Sequence[Sequence[Run]],
    targets: Sequence[torch.Tensor],
    chunks_per_call: int = 1,
    *,
    into_region: bool = False,
) -> float:
    """Copy each chunk's ``runs`` out of ``region`` into its target, one ``memmove`` per run:
    what a store of those chunks copies, with no server around it. As the server takes a
    request's chunks at once, each ``chunks_per_call`` chunks' runs are one call, split into
    ``threads`` consecutive shares run at once, the calls one after the other. Its ratio to
    ``memcpy_seconds`` of as many bytes is what the layout's piece size costs.
    ``into_region`` copies the other way, targets into the runs, as a retrieve does: writing
    the engine's 4 KiB-paged region in 512 KiB pieces is a few % slower than reading it."""
    base = region.data_ptr()
    copies = []  # (destination, source, bytes) of every run, chunk after chunk
    for runs, target in zip(runs_per_chunk, targets, strict=True):
        ends = itertools.accumulate((length for _, length in runs), initial=target.data_ptr())
        chunk = [(dst, base + offset, length) for dst, (offset, length) in zip(ends, runs)]
        copies.append([(src, dst, length) for dst, src, length in chunk] if into_region else chunk)

    def copy(share: Sequence[tuple[int, int, int]]) -> None:
        for dst, src, length in share:
            ctypes.memmove(dst, src, length)

    start = time.perf_counter()
    for first in range(0, len(copies), chunks_per_call):
        call = [run for chunk in copies[first : first + chunks_per_call] for run in chunk]
        cuts = [len(call) * i // threads for i in range(threads + 1)]
        parts = [pool.submit(copy, call[a:b]) for a, b in itertools.pairwise(cuts) if a < b]
        for part in parts:
            part.result()
    return time.perf_counter() - start
