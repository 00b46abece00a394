"""The filesystem L2 adapter: one file per object under a root directory.

* **Names.** ``root/<codec.object_name(key)>``: one prefix per salt, 256 shard
  directories per salt/model/rank, created as needed.
* **Format.** A header (``fs_format``: magic, version, lengths, the key record,
  xxh3 checksums per 1 MiB segment) and then the payload.
* **Writes** go to ``.trio-kv-tmp.*`` in the object's directory and are renamed
  over the final name, so a final name never holds a partial file. There is no
  fsync: this is a cache, and a file torn by a power loss fails its checks and is
  removed like any other invalid file.
* **Reads** check the header against the key and the expected length and verify
  every segment's checksum before reporting a hit. An object of SPLIT_MIN_BYTES
  or more is read by READ_PARTS threads at once while the CPUs are not busy
  with other reads, each opening the file and reading and verifying its own
  whole segments.
* **Invalid files** (torn, truncated, foreign content, another key's record, a
  wrong length, a bad checksum) are misses and are removed (``invalid_removed``).
* **Recovery** (``fs_scan.RecoveryScan``) walks the root: it removes stale temp
  files, skips and counts files with foreign names, and checks the header and size
  of every object. A scan longer than a second shows its progress.
* **Threads.** Every blocking call (``fs_io``) runs in ``trio.to_thread.run_sync``
  under the adapter's limiter and is never abandoned. A put cancelled while it writes
  stops before the rename and removes its temp file, so it publishes all or nothing.
* **O_DIRECT** (optional, ``fs_io.FileOpener``) moves bytes through an aligned
  per-thread bounce buffer; a filesystem that refuses it turns it off with one warning.

The tier's ledger counts payload bytes; each file also holds a header of 4 KiB or more.
One root must not be shared by two running servers (each removes temp files it
did not write when it starts).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator, Sequence

import trio

from ..keys import ObjectKey
from . import codec, fs_format, fs_io, fs_scan
from .base import AdapterError, AdapterHealth, Hit, L2Adapter
from .fs_io import ReadOutcome

log = logging.getLogger(__name__)

READ_PARTS = 2
SPLIT_MIN_BYTES = 8 * 1024 * 1024  # below this a second thread costs more than it saves
_FULL = {errno.ENOSPC, errno.EDQUOT}
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


class FsAdapter(L2Adapter):
    """Objects as files under ``root``. ``invalid_removed``, ``foreign_files``,
    ``temps_removed`` and ``enospc_errors`` count what the name says."""

    kind = "fs"
    needs_capacity = True  # a disk fills up: the tier should evict before it does
    segment_size = fs_format.SEGMENT_SIZE  # per checksum in files written; a multiple of ALIGN
    split_min_bytes = SPLIT_MIN_BYTES  # objects this large may be read by READ_PARTS threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def __init__(
        self,
        root: str,
        *,
        o_direct: bool = False,
        create: bool = True,
        name: str | None = None,
        max_threads: int = 8,
    ) -> None:
        super().__init__(name or f"fs:{root}", max_threads=max_threads)
        self.root = os.path.abspath(root)
        # Whether a missing root is made (the Python API's default) or is a problem; an --l2
        # spec asks for it with ?create=true, so a typo never writes the cache somewhere new.
        self.create = create
        self._opener = fs_io.FileOpener(self.name, self.root, direct=o_direct)
        self._reads_in_flight = 0
        self._writing: set[str] = set()  # temp files of puts in flight: recovery keeps them
        self._problem: tuple[str, str] | None = None  # (state, reason) while unhealthy
        self.invalid_removed = 0
        self.foreign_files = 0
        self.temps_removed = 0
        self.enospc_errors = 0

    @property
    def o_direct(self) -> bool:
        """Whether O_DIRECT is (still) in use."""
        return self._opener.direct

    def path_of(self, key: ObjectKey) -> str:
        """The file that holds ``key``."""
        return os.path.join(self.root, codec.object_name(key))

    def health(self) -> AdapterHealth:
        """Unhealthy while the root cannot be written or the disk is full, as the last
        write (or the recovery scan's check of the root) found; a successful put clears it."""
        if self._problem is None:
            return AdapterHealth(healthy=True)
        state, reason = self._problem
        return AdapterHealth(healthy=False, state=state, reason=reason)

    # ------------------------------------------------------------ put

    async def put(self, key: ObjectKey, payload: memoryview, layout: str = "") -> None:
        payload = fs_io.bytes_view(payload)
        path = self.path_of(key)
        temp = fs_io.temp_path_for(path)
        record = codec.encode_key_record(key, layout)
        self._writing.add(temp)
        try:
            args = (self._opener, temp, record, payload, self.segment_size)
            await trio.to_thread.run_sync(fs_io.write_temp_file, *args, limiter=self.limiter)
            # The write thread cannot be interrupted; a cancellation that came meanwhile stops us here.
            await trio.lowlevel.checkpoint_if_cancelled()
            await trio.to_thread.run_sync(os.replace, temp, path, limiter=self.limiter)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(fs_io.unlink_quietly, temp)
            if isinstance(exc, OSError):
                raise self._write_failed(path, exc) from exc
            raise
        finally:
            self._writing.discard(temp)
        self._set_problem(None)

    def _write_failed(self, path: str, exc: OSError) -> AdapterError:
        if exc.errno in _FULL:
            self.enospc_errors += 1
            self._set_problem(("disk-full", f"no space left under {self.root}: {exc}"))
        elif exc.errno in _UNWRITABLE:
            self._set_problem(("unwritable", f"cannot write under {self.root}: {exc}"))
        return AdapterError(f"{self.name}: writing {path}: {exc}")

    def _set_problem(self, problem: tuple[str, str] | None) -> None:
        """Record the health state; log when it changes (once, not per write)."""
        before = None if self._problem is None else self._problem[0]
        after = None if problem is None else problem[0]
        self._problem = problem
        if after == before:
            return
        if problem is not None:
            log.error("%s: %s: %s; writes fail until it clears", self.name, problem[0], problem[1])
        else:
            log.warning("%s: writable again (was %s)", self.name, before)

    # ------------------------------------------------------------ get

    async def get_into(self, key: ObjectKey, buffer: memoryview) -> Hit | None:
        buffer = fs_io.bytes_view(buffer)
        path = self.path_of(key)
        parts = self._read_parts(len(buffer))
        results: list[tuple[ReadOutcome, str]] = []
        errors: list[OSError] = []

        async def read(part: int) -> None:
            try:
                args = (self._opener, path, key, buffer, part, parts)
                results.append(
                    await trio.to_thread.run_sync(fs_io.read_object_part, *args, limiter=self.limiter)
                )
            except OSError as exc:  # re-raised below, unwrapped from the nursery's group
                errors.append(exc)

        self._reads_in_flight += 1
        try:
            if parts == 1:
                await read(0)
            else:
                async with trio.open_nursery() as nursery:
                    for part in range(parts):
                        nursery.start_soon(read, part)
        finally:
            self._reads_in_flight -= 1
        if errors:
            raise AdapterError(f"{self.name}: reading {path}: {errors[0]}") from errors[0]
        invalid = [reason for outcome, reason in results if outcome is ReadOutcome.INVALID]
        if invalid:
            self.invalid_removed += 1
            log.warning("%s: removed invalid %s: %s", self.name, path, invalid[0])
        if not all(outcome is ReadOutcome.HIT for outcome, _ in results):
            return None
        return Hit(layout=results[0][1])  # every part read the same header

    def _read_parts(self, size: int) -> int:
        """READ_PARTS threads for a large object unless other reads already keep the CPUs
        busy: with two reads in flight on two cores, splitting measured 15% slower."""
        busy = (self._reads_in_flight + 1) * READ_PARTS > self.cpus
        return 1 if size < self.split_min_bytes or busy else READ_PARTS

    # ------------------------------------------------------------ contains, delete

    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        paths = [self.path_of(key) for key in keys]
        try:
            return await trio.to_thread.run_sync(fs_io.files_exist, paths, limiter=self.limiter)
        except OSError as exc:
            raise AdapterError(f"{self.name}: stat: {exc}") from exc

    async def delete(self, keys: Sequence[ObjectKey]) -> None:
        paths = [self.path_of(key) for key in keys]
        try:
            await trio.to_thread.run_sync(fs_io.unlink_all, paths, limiter=self.limiter)
        except OSError as exc:
            raise AdapterError(f"{self.name}: delete: {exc}") from exc

    # ------------------------------------------------------------ recovery scan

    async def scan(self) -> AsyncIterator[tuple[ObjectKey, int]]:
        """Check the root (for ``health``), then every object under it (``fs_scan``)."""
        is_dir, problem = await trio.to_thread.run_sync(
            fs_scan.check_root, self.root, self.create, limiter=self.limiter
        )
        self._set_problem(problem)
        if not is_dir:
            return
        scan = fs_scan.RecoveryScan(self.name, self.root, limiter=self.limiter, keep=self._writing)
        try:
            found = await scan.run()
        finally:
            self.foreign_files = scan.foreign_files
            self.temps_removed += scan.temps_removed
            self.invalid_removed += scan.invalid_removed
        for key, size in found:
            yield key, size
