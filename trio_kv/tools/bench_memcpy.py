"""The copy reference of ``bench cpu`` and ``bench scaling``: ``memmove`` of chunk-sized buffers
split over as many threads as the server copies a chunk with."""

from __future__ import annotations

import ctypes
import itertools
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..transfer.hugepages import advise_huge_pages


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
