"""Shared-memory KV caches the server maps: blocks <-> chunks in the L1 arena with numpy.

Copies run in worker threads (numpy releases the GIL), never on the event loop.
Engine block ids of a chunk are mostly consecutive (vLLM allocates runs): per segment,
a run of at least ``min_run_bytes`` is copied as one slice (a single memmove where the
piece is the block stride); the rows between such runs go through
``np.take(..., mode="clip")`` (gathers) and numpy row assignment (scatters). Large
copies are split row-wise across the thread limiter's threads. Measured on a 2-core VM,
32 MiB chunks, shm -> arena, GB/s with one thread / two: np.take clip 6.2 / 11.1, numpy
row scatter 6.5 / 11.9, memmove of whole chunks 7.2 / 13.7. torch.index_select from a
worker thread starts its own OpenMP team and reached only 4.7 / 7.4; np.take's default
mode="raise" buffers ``out`` and reached 4.0 / 6.9. Slices of runs against per-row take,
CPU time of one thread relative to one memmove of the chunk (median of 50, the VM shared
with other work): 32 MiB chunk (from memory) gather 0.98 vs 1.02, scatter 0.99 vs 1.04;
4 MiB chunk (in cache) gather 1.19 vs 1.24, scatter 1.17 vs 1.24. The row copies were
already memory-bound: the slices gain about 4 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from .layout import KVLayout

_WIDTH_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
# Below this many bytes per call, a second thread costs more than it saves.
SPLIT_MIN_BYTES = 4 * 1024 * 1024
# With at least this many (job, segment) units per thread, threads split a copy by whole units,
# each a run of long slices, not each unit by rows (2-core VM, 4 chunks of 32 MiB, 64 segments:
# 12.1 GB/s split by units, 10.8 split by rows, memmove of the same bytes 13.4).
WHOLE_UNITS_PER_PART = 8
# A run of consecutive block ids at least this many bytes long (per segment) is copied as one
# slice; shorter runs go through np.take, whose per-row overhead a short run does not repay.
MIN_RUN_BYTES = 128 * 1024
# (start, stop, first block) copies rows start:stop of a job from blocks first..; first None: by index.
Step = tuple[int, int, int | None]


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

    def __init__(self, layout: KVLayout, region: torch.Tensor, owner_pidfd: int | None = None) -> None:
        self.layout = layout
        self.region = region  # keeps the mapping alive while any copy uses it
        # A pidfd of the process whose sealed memfd this is (None for a plain shared file):
        # the engine drops the registration when it becomes readable.
        self.owner_pidfd = owner_pidfd
        self.min_run_bytes = MIN_RUN_BYTES  # tests set it to force one copy path
        dtype = _WIDTH_DTYPES[layout.width]
        usable = region.numel() // layout.width * layout.width
        wide = region[:usable].view(dtype)
        self.np_views: list[np.ndarray] = []
        for seg in layout.segments:
            view = torch.as_strided(
                wide,
                (layout.num_blocks, seg.piece_bytes // layout.width),
                (seg.block_stride // layout.width, 1),
                seg.offset // layout.width,
            )
            self.np_views.append(view.numpy())

    def _segment_rows(self, buffer: torch.Tensor, n_blocks: int) -> list[np.ndarray]:
        """The chunk buffer cut into one (n_blocks, piece) matrix per segment."""
        wide = buffer.view(_WIDTH_DTYPES[self.layout.width]).numpy()
        rows, cursor = [], 0
        for seg in self.layout.segments:
            length = n_blocks * seg.piece_bytes // self.layout.width
            rows.append(wide[cursor : cursor + length].reshape(n_blocks, -1))
            cursor += length
        return rows

    def gather(self, jobs: Sequence[CopyJob], part: int = 0, parts: int = 1) -> None:
        """Engine blocks -> L1 chunk buffers (blocking; run in a thread).

        With ``parts`` > 1 this call copies share ``part`` of the rows only;
        the ``parts`` calls together copy everything.
        """
        unit = 0
        whole = self._whole_units(jobs, parts)
        for job in jobs:
            index = np.asarray(job.block_ids, dtype=np.int64)
            plans: dict[tuple[int, int, int], list[Step]] = {}
            for seg, view, rows in zip(
                self.layout.segments, self.np_views, self._segment_rows(job.buffer, len(index))
            ):
                share = share_of(len(index), part + unit, parts, whole)
                unit += 1
                for start, stop, first in self._steps(plans, index, share, seg.piece_bytes):
                    if first is not None:
                        rows[start:stop] = view[first : first + stop - start]
                    else:
                        # Block ids were checked against the registration; "clip" also skips numpy's out buffer.
                        np.take(view, index[start:stop], axis=0, out=rows[start:stop], mode="clip")

    def scatter(self, jobs: Sequence[CopyJob], part: int = 0, parts: int = 1) -> None:
        """L1 chunk buffers -> engine blocks, from ``first_block`` on (blocking; run in a thread).
        ``part`` and ``parts`` split the rows as in ``gather``."""
        unit = 0
        whole = self._whole_units(jobs, parts)
        for job in jobs:
            index = np.asarray(job.block_ids[job.first_block :], dtype=np.int64)
            if index.size == 0:
                continue
            plans: dict[tuple[int, int, int], list[Step]] = {}
            for seg, view, all_rows in zip(
                self.layout.segments, self.np_views, self._segment_rows(job.buffer, len(job.block_ids))
            ):
                rows = all_rows[job.first_block :]
                share = share_of(len(index), part + unit, parts, whole)
                unit += 1
                for start, stop, first in self._steps(plans, index, share, seg.piece_bytes):
                    if first is not None:
                        view[first : first + stop - start] = rows[start:stop]
                    else:
                        view[index[start:stop]] = rows[start:stop]

    def _whole_units(self, jobs: Sequence[CopyJob], parts: int) -> bool:
        """Whether ``parts`` calls split ``jobs`` by whole (job, segment) units rather than rows."""
        return parts > 1 and len(jobs) * len(self.layout.segments) >= WHOLE_UNITS_PER_PART * parts

    def _steps(
        self, plans: dict[tuple[int, int, int], list[Step]], index: np.ndarray, share: slice, piece_bytes: int
    ) -> list[Step]:
        """``copy_steps`` of one share of a job, computed once per job for segments alike."""
        min_rows = max(1, -(-self.min_run_bytes // piece_bytes))
        key = (share.start, share.stop, min_rows)
        steps = plans.get(key)
        if steps is None:
            steps = plans[key] = copy_steps(index, share, min_rows)
        return steps

    def copy_bytes(self, jobs: Sequence[CopyJob]) -> int:
        """Bytes a gather or scatter of ``jobs`` moves."""
        blocks = sum(len(job.block_ids) - job.first_block for job in jobs)
        return blocks * self.layout.block_bytes


def share_of(rows: int, turn: int, parts: int, whole: bool = False) -> slice:
    """Slice ``turn % parts`` of ``rows`` split ``parts`` ways. Callers rotate ``turn``
    per segment, so segments of one row still spread evenly over the parts. ``whole``: the
    unit is not split; it is all of ``rows`` for one turn in ``parts`` and nothing for the rest."""
    k = turn % parts
    if whole:
        return slice(0, rows) if k == 0 else slice(0, 0)
    return slice(k * rows // parts, (k + 1) * rows // parts)


def copy_steps(index: np.ndarray, share: slice, min_rows: int) -> list[Step]:
    """Rows ``share`` of a job with engine blocks ``index``, as copy steps in row order: each run
    of consecutive block ids at least ``min_rows`` long is one slice step, and each stretch of
    rows between such runs one indexed step. Together the steps cover ``share`` exactly once."""
    start, stop = share.start, share.stop
    if stop - start < min_rows:
        return [(start, stop, None)] if start < stop else []
    ids = index[start:stop]
    edges = [0, *(np.flatnonzero(np.diff(ids) != 1) + 1).tolist(), stop - start]
    steps: list[Step] = []
    pending: int | None = None  # first row of a stretch of short runs not yet emitted
    for a, b in pairwise(edges):
        if b - a < min_rows:
            pending = a if pending is None else pending
            continue
        if pending is not None:
            steps.append((start + pending, start + a, None))
            pending = None
        steps.append((start + a, start + b, int(ids[a])))
    if pending is not None:
        steps.append((start + pending, stop, None))
    return steps
