"""The CPU transfer path: blocks in shared-memory KV caches <-> chunks in the L1 arena.

Sealed memfds (which cannot shrink) are mapped and copied with numpy
(``mapped.py``); plain files under ``shm_dir``, which their engine could truncate
under a mapping (SIGBUS), are copied with preadv/pwritev (``file_copy.py``).
Copies run in worker threads (``copy_threads.py``), never on the event loop; large copies
are split across them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Sequence

from ..export.memfd import open_sealed_region, sealed_path_owner
from ..export.shm import open_registered_file
from ..protocol import RegisterKVCache
from .copy_threads import CopyThreads
from .file_copy import FileKVCache
from .layout import plan_layout
from .mapped import SPLIT_MIN_BYTES, CopyJob, MappedKVCache
from .sched import set_thread_slice

__all__ = ["COPY_NICE", "SPLIT_MIN_BYTES", "CopyJob", "CpuTransfer", "MappedKVCache"]

# Copy threads run this much nicer than the event loop's thread: on a machine with as many
# cores as copy threads, the loop otherwise waits a scheduler time slice (measured: event-loop
# lag p99 8 ms while copying on 2 cores) for a core to answer a lookup.
COPY_NICE = 5


def _lower_priority() -> None:
    """Run once in each copy thread as it starts: nicer than the loop, the default time slice
    (not the loop's short one the thread inherited)."""
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + COPY_NICE)
        set_thread_slice(0)


class CpuTransfer:
    """Transfer backend for shared-memory KV caches; copies run on ``threads`` worker threads."""

    name = "cpu"

    def __init__(self, threads: int = 2, shm_dir: str = "/dev/shm") -> None:
        self.copy_threads = CopyThreads(threads, initializer=_lower_priority)
        self.shm_dir = shm_dir

    def open(self, request: RegisterKVCache, *, owner_uid: int | None = None) -> MappedKVCache:
        """Validate and open a registration (raises BAD_REGISTRATION; PERMISSION_DENIED for a
        file not owned by ``owner_uid``, the registering peer's uid where it is known).

        ``shm_path`` is a sealed memfd of the engine's (``/proc/<pid>/fd/<fd>``) or a
        shared file under ``shm_dir``."""
        if sealed_path_owner(request.shm_path) is None:
            fd = open_registered_file(request, self.shm_dir, owner_uid)
            try:
                layout = plan_layout(request.tensors, request.block_size, request.shm_bytes)
            except BaseException:
                os.close(fd)
                raise
            return FileKVCache(layout, fd, request.shm_bytes)
        opened = open_sealed_region(request.shm_path, request.shm_bytes, owner_uid)
        try:
            layout = plan_layout(request.tensors, request.block_size, opened.tensor.numel())
        except BaseException:
            os.close(opened.owner_pidfd)
            raise
        return MappedKVCache(layout, opened.tensor, opened.owner_pidfd)

    async def aopen(self, request: RegisterKVCache, *, owner_uid: int | None = None) -> MappedKVCache:
        """``open``, for the event loop: opening shared memory takes a few system calls, done here
        (CUDA registrations open in a worker thread: ``CudaTransfer.aopen``)."""
        return self.open(request, owner_uid=owner_uid)

    def discard(self, cache: MappedKVCache) -> None:
        """Close a cache ``aopen`` returned that is not registered after all (no copy holds it)."""
        if cache.owner_pidfd is not None:
            os.close(cache.owner_pidfd)

    async def wait_released(self, timeout_s: float = 10.0) -> bool:
        """Shared-memory mappings are released as their objects go: nothing to wait for."""
        return True

    def problems(self) -> list[str]:
        """Why this backend cannot copy any more, which only a restart mends (none here)."""
        return []

    async def wait_unmapped(self, cache: MappedKVCache, timeout_s: float = 10.0) -> bool:
        """Return once a retired ``cache`` maps nothing any more (CUDA: ``CudaTransfer``). The
        engine's memory stays valid under a shared-memory mapping, so here there is no wait."""
        return True

    async def _run(
        self,
        copy: Callable[[Sequence[CopyJob], int, int], None],
        cache: MappedKVCache,
        jobs: Sequence[CopyJob],
    ) -> None:
        """Run ``copy`` in the copy threads, split across them when the jobs are large.
        Threads are never abandoned, so no copy is running once this returns or raises."""
        threads = self.copy_threads.threads
        parts = min(threads, max(1, cache.copy_bytes(jobs) // SPLIT_MIN_BYTES))
        await self.copy_threads.run([functools.partial(copy, jobs, part, parts) for part in range(parts)])

    async def store(self, cache: MappedKVCache, jobs: Sequence[CopyJob], *, ipc_event: bytes = b"") -> None:
        """Copy blocks into L1. Not abandoned on cancellation: the copy finishes first,
        so the caller may free the buffers as soon as this returns or raises.
        ``ipc_event`` is for CUDA registrations; shared memory has nothing to wait on."""
        await self._run(cache.gather, cache, jobs)

    async def retrieve(
        self, cache: MappedKVCache, jobs: Sequence[CopyJob], *, ipc_event: bytes = b""
    ) -> None:
        """Copy L1 chunks into blocks; as ``store`` on cancellation."""
        await self._run(cache.scatter, cache, jobs)
