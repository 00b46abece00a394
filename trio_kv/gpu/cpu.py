"""The CPU transfer path: blocks in shared-memory tensors <-> chunks in the L1 arena.

Copies run in worker threads (torch and numpy release the GIL), never on the
event loop. Gathers use torch.index_select and scatters numpy row assignment:
measured on a 2-core VM, torch's index_copy_ reached 0.25-0.6x memcpy while
numpy's row scatter reached 0.93x.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import trio

from ..protocol import RegisterKVCache
from .layout import KVLayout, plan_layout
from .shm import open_registered_region

_WIDTH_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@dataclass
class CopyJob:
    """One chunk: ``block_ids[j]`` is the engine block of the chunk's j-th block.

    Blocks before ``first_block`` are left alone (the engine already holds them).
    ``buffer`` is the chunk's bytes in L1.
    """

    block_ids: Sequence[int]
    buffer: torch.Tensor
    first_block: int = 0


class MappedKVCache:
    """A registered KV cache as the server sees it: the mapped region and per-segment views."""

    def __init__(self, layout: KVLayout, region: torch.Tensor) -> None:
        self.layout = layout
        self.region = region  # keeps the mapping alive while any copy uses it
        dtype = _WIDTH_DTYPES[layout.width]
        usable = region.numel() // layout.width * layout.width
        wide = region[:usable].view(dtype)
        self.views: list[torch.Tensor] = []
        self.np_views: list[np.ndarray] = []
        for seg in layout.segments:
            view = torch.as_strided(
                wide,
                (layout.num_blocks, seg.piece_bytes // layout.width),
                (seg.block_stride // layout.width, 1),
                seg.offset // layout.width,
            )
            self.views.append(view)
            self.np_views.append(view.numpy())

    def _segment_rows(self, buffer: torch.Tensor, n_blocks: int) -> list[torch.Tensor]:
        """The chunk buffer cut into one (n_blocks, piece) matrix per segment."""
        wide = buffer.view(_WIDTH_DTYPES[self.layout.width])
        rows, cursor = [], 0
        for seg in self.layout.segments:
            length = n_blocks * seg.piece_bytes // self.layout.width
            rows.append(wide[cursor : cursor + length].view(n_blocks, -1))
            cursor += length
        return rows

    def gather(self, jobs: Sequence[CopyJob]) -> None:
        """Engine blocks -> L1 chunk buffers (blocking; run in a thread)."""
        for job in jobs:
            index = torch.tensor(job.block_ids, dtype=torch.int64)
            for view, out in zip(self.views, self._segment_rows(job.buffer, len(job.block_ids))):
                torch.index_select(view, 0, index, out=out)

    def scatter(self, jobs: Sequence[CopyJob]) -> None:
        """L1 chunk buffers -> engine blocks, from ``first_block`` on (blocking; run in a thread)."""
        for job in jobs:
            index = np.asarray(job.block_ids[job.first_block :], dtype=np.int64)
            if index.size == 0:
                continue
            for view, rows in zip(self.np_views, self._segment_rows(job.buffer, len(job.block_ids))):
                view[index] = rows.numpy()[job.first_block :]


class CpuTransfer:
    """Transfer backend for shared-memory KV caches; bounded by a thread limiter."""

    name = "cpu"

    def __init__(self, threads: int = 2, shm_dir: str = "/dev/shm") -> None:
        self.limiter = trio.CapacityLimiter(threads)
        self.shm_dir = shm_dir

    def open(self, request: RegisterKVCache) -> MappedKVCache:
        """Validate and map a registration (raises BAD_REGISTRATION)."""
        region = open_registered_region(request, self.shm_dir)
        layout = plan_layout(request.tensors, request.block_size, region.numel())
        return MappedKVCache(layout, region)

    async def store(self, cache: MappedKVCache, jobs: Sequence[CopyJob]) -> None:
        """Copy blocks into L1. Not abandoned on cancellation: the copy finishes first,
        so the caller may free the buffers as soon as this returns or raises."""
        await trio.to_thread.run_sync(cache.gather, jobs, limiter=self.limiter)

    async def retrieve(self, cache: MappedKVCache, jobs: Sequence[CopyJob]) -> None:
        """Copy L1 chunks into blocks; as ``store`` on cancellation."""
        await trio.to_thread.run_sync(cache.scatter, jobs, limiter=self.limiter)
