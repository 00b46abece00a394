"""Shared-memory KV caches the server maps: blocks <-> chunks in the L1 arena with numpy.

Copies run in worker threads (numpy releases the GIL), never on the event loop.
Consecutive segments alike (piece, block stride, evenly spaced offsets: a per-layer layout's
K and V of every layer) are one strided 3-D view (``group_segments``), so a run of consecutive
block ids (vLLM allocates runs) of all of them is one numpy copy: a 4-chunk store of
Llama-3-8B's shape is a handful of calls, not 256 per-segment ones, and two copy threads no
longer queue on the GIL between calls. Runs shorter than ``min_run_bytes`` go through
``np.take(..., mode="clip")`` per segment (gathers) and numpy fancy assignment (scatters).
Large copies are split across the copy threads (copy_threads.py): by segments where there are
many, else by rows. Measured on a 2-core VM, 4 x 32 MiB chunks, 64 segments, shm -> arena,
two threads: per-segment copies split by rows 10.5-10.8 GB/s, by whole segments 11.4-11.8,
grouped 12.7-13.0; memmove of the same bytes 13.3-13.9 (one thread: grouped 7.0, memmove
7.0-7.1). Earlier: torch.index_select from a worker thread starts its own OpenMP team and
reached only 4.7 / 7.4 GB/s (one / two threads); np.take's default mode="raise" buffers
``out`` and reached 4.0 / 6.9.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from .layout import KVLayout, Segment

_WIDTH_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
# Below this many bytes per call, a second thread costs more than it saves.
SPLIT_MIN_BYTES = 4 * 1024 * 1024
# With at least this many (job, segment) units per thread, threads split a copy by segments,
# each a run of long slices, not every segment by rows (2-core VM, 4 chunks of 32 MiB, 64
# segments, before grouping: 11.4-11.8 GB/s by segments, 10.5-10.8 by rows).
WHOLE_UNITS_PER_PART = 8
# A run of consecutive block ids at least this many bytes long (over the segments of a group
# copied together) is copied as one slice; shorter runs go through np.take, segment by segment,
# whose per-row overhead a short run does not repay.
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


class _Group:
    """Consecutive segments alike (piece, block stride) at evenly spaced offsets, seen as one
    3-D array (segment, block, piece) over the region: a run of blocks of all of them is one
    copy. A per-layer layout's K and V tensors of every layer make one group."""

    __slots__ = ("count", "piece", "view")

    def __init__(self, count: int, piece: int, view: np.ndarray) -> None:
        self.count, self.piece, self.view = count, piece, view


class MappedKVCache:
    """A registered KV cache as the server sees it: the mapped region and views of its segments."""

    def __init__(self, layout: KVLayout, region: torch.Tensor, owner_pidfd: int | None = None) -> None:
        self.layout = layout
        self.region = region  # keeps the mapping alive while any copy uses it
        # A pidfd of the process whose sealed memfd this is (None for a plain shared file):
        # the engine drops the registration when it becomes readable.
        self.owner_pidfd = owner_pidfd
        self.min_run_bytes = MIN_RUN_BYTES  # tests set it to force one copy path
        width = layout.width
        usable = region.numel() // width * width
        wide = region[:usable].view(_WIDTH_DTYPES[width])
        self.groups: list[_Group] = []
        for first, count in group_segments(layout.segments):
            seg = layout.segments[first]
            delta = layout.segments[first + 1].offset - seg.offset if count > 1 else 0
            view = torch.as_strided(
                wide,
                (count, layout.num_blocks, seg.piece_bytes // width),
                (delta // width, seg.block_stride // width, 1),
                seg.offset // width,
            )
            self.groups.append(_Group(count, seg.piece_bytes // width, view.numpy()))

    def retire(self) -> None:
        """The registration is gone (unregistered, replaced, or its connection or owner went
        away). A shared-memory mapping needs nothing here: it goes with its last reference."""

    def _group_rows(self, buffer: torch.Tensor, n_blocks: int) -> list[np.ndarray]:
        """The chunk buffer cut into one (segment, n_blocks, piece) array per group: L1 holds
        a chunk segment after segment, each segment's piece of every block in order."""
        wide = buffer.view(_WIDTH_DTYPES[self.layout.width]).numpy()
        rows, cursor = [], 0
        for group in self.groups:
            length = group.count * n_blocks * group.piece
            rows.append(wide[cursor : cursor + length].reshape(group.count, n_blocks, group.piece))
            cursor += length
        return rows

    def _shares(
        self, row_counts: Sequence[int], part: int, parts: int
    ) -> Iterator[tuple[int, int, slice, slice]]:
        """What call ``part`` of ``parts`` copies of jobs of ``row_counts`` rows: (job, group,
        segments of the group, rows of the job). With many (job, segment) units the parts take whole
        segments in turn, each a run of long slices; with few, each part takes a share of the
        rows of every segment. The turn rotates per (job, group), so remainders spread out."""
        whole = parts > 1 and len(row_counts) * len(self.layout.segments) >= WHOLE_UNITS_PER_PART * parts
        turn = part
        for job_index, rows in enumerate(row_counts):
            for group_index, group in enumerate(self.groups):
                if whole:
                    segments, share = share_of(group.count, turn, parts), slice(0, rows)
                else:
                    segments, share = slice(0, group.count), share_of(rows, turn, parts)
                turn += 1
                if segments.start < segments.stop and share.start < share.stop:
                    yield job_index, group_index, segments, share

    def gather(self, jobs: Sequence[CopyJob], part: int = 0, parts: int = 1) -> None:
        """Engine blocks -> L1 chunk buffers (blocking; run in a thread).

        With ``parts`` > 1 this call copies share ``part`` of the segments or rows only;
        the ``parts`` calls together copy everything. ``first_block`` does not apply.
        """
        indexes = [np.asarray(job.block_ids, dtype=np.int64) for job in jobs]
        buffers = [self._group_rows(job.buffer, len(index)) for job, index in zip(jobs, indexes)]
        plans: dict[tuple[int, int, int, int], list[Step]] = {}
        for job_index, group_index, segments, share in self._shares([len(i) for i in indexes], part, parts):
            group, index = self.groups[group_index], indexes[job_index]
            view, rows = group.view[segments], buffers[job_index][group_index][segments]
            for start, stop, first in self._steps(plans, job_index, index, share, len(view) * group.piece):
                if first is not None:
                    rows[:, start:stop] = view[:, first : first + stop - start]
                    continue
                for k in range(len(view)):
                    # Block ids were checked against the registration; "clip" also skips numpy's out buffer.
                    np.take(view[k], index[start:stop], axis=0, out=rows[k, start:stop], mode="clip")

    def scatter(self, jobs: Sequence[CopyJob], part: int = 0, parts: int = 1) -> None:
        """L1 chunk buffers -> engine blocks, from ``first_block`` on (blocking; run in a thread).
        ``part`` and ``parts`` split the copy as in ``gather``."""
        indexes = [np.asarray(job.block_ids[job.first_block :], dtype=np.int64) for job in jobs]
        buffers = [self._group_rows(job.buffer, len(job.block_ids)) for job in jobs]
        plans: dict[tuple[int, int, int, int], list[Step]] = {}
        for job_index, group_index, segments, share in self._shares([len(i) for i in indexes], part, parts):
            group, index = self.groups[group_index], indexes[job_index]
            skip = jobs[job_index].first_block
            view = group.view[segments]
            rows = buffers[job_index][group_index][segments, skip:]
            for start, stop, first in self._steps(plans, job_index, index, share, len(view) * group.piece):
                if first is not None:
                    view[:, first : first + stop - start] = rows[:, start:stop]
                else:
                    view[:, index[start:stop]] = rows[:, start:stop]

    def _steps(
        self,
        plans: dict[tuple[int, int, int, int], list[Step]],
        job_index: int,
        index: np.ndarray,
        share: slice,
        row: int,
    ) -> list[Step]:
        """``copy_steps`` of one share of a job whose rows are ``row`` elements over the
        segments copied together, computed once per job for groups alike."""
        min_rows = max(1, -(-self.min_run_bytes // (row * self.layout.width)))
        key = (job_index, share.start, share.stop, min_rows)
        steps = plans.get(key)
        if steps is None:
            steps = plans[key] = copy_steps(index, share, min_rows)
        return steps

    def copy_bytes(self, jobs: Sequence[CopyJob]) -> int:
        """Bytes a gather or scatter of ``jobs`` moves."""
        blocks = sum(len(job.block_ids) - job.first_block for job in jobs)
        return blocks * self.layout.block_bytes


def group_segments(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive segments with one piece size and block
    stride whose offsets grow by one positive step: each run is one strided 3-D view."""
    groups: list[tuple[int, int]] = []
    first = 0
    for i in range(1, len(segments) + 1):
        if i < len(segments):
            a, b = segments[first], segments[i]
            step = segments[first + 1].offset - a.offset  # the group's step (b's own, if b is second)
            if (
                b.piece_bytes == a.piece_bytes
                and b.block_stride == a.block_stride
                and step > 0
                and b.offset - segments[i - 1].offset == step
            ):
                continue
        groups.append((first, i - first))
        first = i
    return groups


def share_of(rows: int, turn: int, parts: int) -> slice:
    """Slice ``turn % parts`` of ``rows`` split ``parts`` ways. Callers rotate ``turn``
    per segment, so segments of one row still spread evenly over the parts."""
    k = turn % parts
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
