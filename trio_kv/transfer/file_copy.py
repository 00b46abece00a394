"""The CPU transfer path for plain (unsealed) shared-memory files: preadv/pwritev, no mapping.

A plain file under ``shm_dir`` can be truncated by its engine at any time, and a
mapping touched past the end of a shrunken file raises SIGBUS, which kills the
whole server. So these files are never mapped: blocks are copied through the
file descriptor, and a truncated file is an EOF, i.e. a TRANSFER_FAILED reply.
Sealed memfds (which cannot shrink) keep the mmap + numpy path of ``cpu.py``.

Copies are coalesced: the pieces of a call (one segment of a run of blocks) are
sorted by file offset, and pieces whose file ranges abut become one preadv or
pwritev with one iovec per piece (a memoryview into the L1 buffer), up to IOV_MAX.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import ErrorCode, TrioKVError
from .layout import KVLayout
from .mapped import CopyJob, MappedKVCache, share_of

IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
# Linux moves at most about 2 GiB per read or write call; stay well below it.
MAX_CALL_BYTES = 1 << 30

Piece = tuple[int, memoryview]  # (file offset, L1 bytes)


class FileKVCache(MappedKVCache):
    """A registered plain shared-memory file, copied through ``fd`` (closed with the object).

    Subclasses MappedKVCache so the engine, typed against the CPU path, accepts it;
    it has no mapping and no numpy views.
    """

    def __init__(self, layout: KVLayout, fd: int, nbytes: int) -> None:
        self.layout = layout
        self.owner_pidfd = None
        self.fd = fd
        self.nbytes = nbytes  # the registered size: a file now shorter was truncated
        # Copies in flight hold a reference, so the descriptor outlives them.
        weakref.finalize(self, os.close, fd)

    def gather(self, jobs: Sequence[CopyJob], part: int = 0, parts: int = 1) -> None:
        """Engine blocks -> L1 chunk buffers with preadv (blocking; run in a thread).
        Raises TRANSFER_FAILED if the file ends early (it was truncated)."""
        for offset, views in _calls(self._pieces(jobs, part, parts, scatter=False)):
            _move_all(os.preadv, self.fd, views, offset, self._truncated)

    def scatter(self, jobs: Sequence[CopyJob], part: int = 0, parts: int = 1) -> None:
        """L1 chunk buffers -> engine blocks from ``first_block`` on, with pwritev.
        A write past the end would grow a truncated file back, so the size is checked first."""
        calls = _calls(self._pieces(jobs, part, parts, scatter=True))
        if calls and os.fstat(self.fd).st_size < self.nbytes:
            raise self._truncated()
        for offset, views in calls:
            _move_all(os.pwritev, self.fd, views, offset, self._truncated)

    def _truncated(self) -> TrioKVError:
        size = os.fstat(self.fd).st_size
        return TrioKVError(
            ErrorCode.TRANSFER_FAILED,
            f"the KV cache file holds {size} bytes, {self.nbytes} were registered: it was truncated",
        )

    def _pieces(self, jobs: Sequence[CopyJob], part: int, parts: int, *, scatter: bool) -> list[Piece]:
        """Share ``part`` of ``parts`` of the jobs' rows (split as the mapped path splits
        them) as pieces: each a run of blocks contiguous in the file, for one segment."""
        pieces: list[Piece] = []
        unit = 0
        for job in jobs:
            first = job.first_block if scatter else 0
            index = np.asarray(job.block_ids[first:], dtype=np.int64)
            if index.size == 0:
                continue
            chunk = memoryview(job.buffer.numpy())  # type: ignore[arg-type]
            cursor = 0
            for seg in self.layout.segments:
                share = share_of(len(index), part + unit, parts)
                unit += 1
                rows = index[share]
                if rows.size:
                    offsets = seg.offset + rows * seg.block_stride
                    breaks = (np.flatnonzero(np.diff(offsets) != seg.piece_bytes) + 1).tolist()
                    for lo, hi in itertools.pairwise([0, *breaks, len(rows)]):
                        at = cursor + (first + share.start + lo) * seg.piece_bytes
                        length = (hi - lo) * seg.piece_bytes
                        pieces.append((int(offsets[lo]), chunk[at : at + length]))
                cursor += len(job.block_ids) * seg.piece_bytes
        return pieces


def _calls(pieces: list[Piece]) -> list[tuple[int, list[memoryview]]]:
    """Pieces sorted by file offset, those whose file ranges abut joined into one call."""
    pieces.sort(key=lambda piece: piece[0])
    calls: list[tuple[int, list[memoryview]]] = []
    end = size = -1
    for offset, view in pieces:
        if offset == end and len(calls[-1][1]) < IOV_MAX and size + len(view) <= MAX_CALL_BYTES:
            calls[-1][1].append(view)
            size += len(view)
        else:
            calls.append((offset, [view]))
            size = len(view)
        end = offset + len(view)
    return calls


def _move_all(
    move: Callable[[int, Sequence[memoryview], int], int],
    fd: int,
    views: list[memoryview],
    offset: int,
    truncated: Callable[[], TrioKVError],
) -> None:
    """Call ``move`` (preadv or pwritev) until every byte of ``views`` has moved; a call
    that moves nothing (end of file) raises ``truncated()``."""
    first = 0
    while first < len(views):
        moved = move(fd, views[first:] if first else views, offset)
        if moved <= 0:
            raise truncated()
        offset += moved
        while first < len(views) and moved >= len(views[first]):
            moved -= len(views[first])
            first += 1
        if moved:  # a short call ended inside this view: go on from its rest
            views[first] = views[first][moved:]
