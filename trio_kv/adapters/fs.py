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
* **Recovery** (``_scan``) walks the root: it removes stale temp files (a crash
  mid-write), skips and counts files with foreign names, and checks the header
  and size of every object (payload checksums are verified when it is read).
  A scan longer than a second shows its progress (``ScanProgress``).
* **Threads.** Every blocking call runs in ``trio.to_thread.run_sync`` under the
  adapter's limiter and is never abandoned. A put cancelled while it writes
  stops before the rename and removes its temp file, so it publishes all or nothing.
* **O_DIRECT** (optional) moves bytes through an aligned per-thread bounce
  buffer; a filesystem that refuses it (EINVAL) turns it off with one warning.

The ledger counts payload bytes; each file also holds a header of 4 KiB or more.
One root must not be shared by two running servers (each removes temp files it
did not write when it starts).
"""

from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TextIO

import trio

from ..keys import ObjectKey
from . import codec, fs_format
from .base import AdapterError, AdapterHealth, L2Adapter

log = logging.getLogger(__name__)

TEMP_PREFIX = ".trio-kv-tmp."
READ_PARTS = 2
SPLIT_MIN_BYTES = 8 * 1024 * 1024  # below this a second thread costs more than it saves
DIRECT_CHUNK = fs_format.SEGMENT_SIZE  # bounce buffer per thread for O_DIRECT: one segment
SCAN_BATCH = 256  # files checked per thread call during recovery
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_FULL = {errno.ENOSPC, errno.EDQUOT}
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}
_thread_state = threading.local()


class _Outcome(enum.Enum):
    HIT = "hit"
    MISSING = "missing"
    INVALID = "invalid"  # removed


class FsAdapter(L2Adapter):
    """Objects as files under ``root``. ``invalid_removed``, ``foreign_files``,
    ``temps_removed`` and ``enospc_errors`` count what the name says."""

    kind = "fs"
    segment_size = fs_format.SEGMENT_SIZE  # per checksum in files written; a multiple of ALIGN
    split_min_bytes = SPLIT_MIN_BYTES  # objects this large may be read by READ_PARTS threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def __init__(
        self,
        root: str,
        *,
        capacity: int | None = None,
        o_direct: bool = False,
        name: str | None = None,
        **base_kwargs: object,
    ) -> None:
        super().__init__(name or f"fs:{root}", capacity=capacity, **base_kwargs)  # type: ignore[arg-type]
        self.root = os.path.abspath(root)
        if o_direct and not _O_DIRECT:
            log.warning("%s: O_DIRECT is not available on this platform; using buffered I/O", self.name)
        self.o_direct = o_direct and bool(_O_DIRECT)  # whether O_DIRECT is (still) in use
        self._direct_lock = threading.Lock()
        self._reads_in_flight = 0
        self._writing: set[str] = set()  # temp files of puts in flight: recovery keeps them
        self._problem: tuple[str, str] | None = None  # (state, reason) while unhealthy
        self.invalid_removed = 0
        self.foreign_files = 0
        self.temps_removed = 0
        self.enospc_errors = 0

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

    async def _put(self, key: ObjectKey, payload: memoryview) -> None:
        payload = _bytes_view(payload)
        path = self.path_of(key)
        directory, filename = os.path.split(path)
        temp = os.path.join(directory, f"{TEMP_PREFIX}{filename}.{os.getpid()}.{secrets.token_hex(4)}")
        record = codec.encode_key_record(key)
        self._writing.add(temp)
        try:
            await trio.to_thread.run_sync(self._write_temp, temp, record, payload, limiter=self.limiter)
            # The write thread cannot be interrupted; a cancellation that came meanwhile stops us here.
            await trio.lowlevel.checkpoint_if_cancelled()
            await trio.to_thread.run_sync(os.replace, temp, path, limiter=self.limiter)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink_quietly, temp)
            if isinstance(exc, OSError):
                raise self._write_failed(path, exc) from exc
            raise
        finally:
            self._writing.discard(temp)
        self._problem = None

    def _write_temp(self, temp: str, record: bytes, payload: memoryview) -> None:
        """Write payload and header to a new temp file (in a thread); removes it on failure.
        Each segment is hashed just before it is written, while it is in the CPU cache,
        and the header, which holds the checksums, is written last."""
        segment = self.segment_size
        header_len = fs_format.header_size(len(record), len(payload), segment)
        try:
            fd, direct = self._open(temp, _CREATE)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(temp), exist_ok=True)
            fd, direct = self._open(temp, _CREATE)
        try:
            try:
                bounce = _bounce_buffer() if direct else None
                checksums = []
                for lo in range(0, len(payload), segment):
                    piece = payload[lo : lo + segment]
                    checksums.append(fs_format.checksum(piece))
                    _pwrite(fd, piece, header_len + lo, bounce)
                header = fs_format.encode_header_with(record, len(payload), checksums, segment)
                _pwrite(fd, memoryview(header), 0, bounce)
                if direct:
                    os.ftruncate(fd, header_len + len(payload))  # drop the last write's padding
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(temp)
            raise

    def _write_failed(self, path: str, exc: OSError) -> AdapterError:
        if exc.errno in _FULL:
            self.enospc_errors += 1
            self._problem = ("disk-full", f"no space left under {self.root}: {exc}")
        elif exc.errno in _UNWRITABLE:
            self._problem = ("unwritable", f"cannot write under {self.root}: {exc}")
        return AdapterError(f"{self.name}: writing {path}: {exc}")

    # ------------------------------------------------------------ get

    async def _get_into(self, key: ObjectKey, buffer: memoryview) -> bool:
        buffer = _bytes_view(buffer)
        path = self.path_of(key)
        parts = self._read_parts(len(buffer))
        results: list[tuple[_Outcome, str]] = []
        errors: list[OSError] = []

        async def read(part: int) -> None:
            try:
                args = (path, key, buffer, part, parts)
                results.append(await trio.to_thread.run_sync(self._read_part, *args, limiter=self.limiter))
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
        invalid = [reason for outcome, reason in results if outcome is _Outcome.INVALID]
        if invalid:
            self.invalid_removed += 1
            log.warning("%s: removed invalid %s: %s", self.name, path, invalid[0])
        return all(outcome is _Outcome.HIT for outcome, _ in results)

    def _read_parts(self, size: int) -> int:
        """READ_PARTS threads for a large object unless other reads already keep the CPUs
        busy: with two reads in flight on two cores, splitting measured 15% slower."""
        busy = (self._reads_in_flight + 1) * READ_PARTS > self.cpus
        return 1 if size < self.split_min_bytes or busy else READ_PARTS

    def _read_part(
        self, path: str, key: ObjectKey, buffer: memoryview, part: int, parts: int
    ) -> tuple[_Outcome, str]:
        """Check the header and read and verify part ``part`` of ``parts`` into ``buffer``
        (in a thread); an invalid file is removed."""
        try:
            fd, direct = self._open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return _Outcome.MISSING, ""
        try:
            bounce = _bounce_buffer() if direct else None
            try:
                header = _read_header(fd, bounce)
            except fs_format.HeaderError as exc:
                problem: str | None = str(exc)
            else:
                size = os.fstat(fd).st_size
                problem = fs_format.mismatch(header, file_size=size, key=key, payload_len=len(buffer))
                if problem is None:
                    lo, hi = fs_format.part_range(header.payload_len, header.segment_size, part, parts)
                    problem = _read_verified(fd, header, buffer, lo, hi, bounce)
            if problem is None:
                return _Outcome.HIT, ""
            _remove_invalid(path, fd)
            return _Outcome.INVALID, problem
        finally:
            os.close(fd)

    # ------------------------------------------------------------ contains, delete

    async def _contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        paths = [self.path_of(key) for key in keys]
        try:
            return await trio.to_thread.run_sync(_files_exist, paths, limiter=self.limiter)
        except OSError as exc:
            raise AdapterError(f"{self.name}: stat: {exc}") from exc

    async def _delete(self, keys: Sequence[ObjectKey]) -> None:
        paths = [self.path_of(key) for key in keys]
        try:
            await trio.to_thread.run_sync(_unlink_all, paths, limiter=self.limiter)
        except OSError as exc:
            raise AdapterError(f"{self.name}: delete: {exc}") from exc

    # ------------------------------------------------------------ recovery scan

    async def _scan(self) -> AsyncIterator[tuple[ObjectKey, int]]:
        progress = ScanProgress(f"{self.name}: recovery scan")
        found: list[tuple[ObjectKey, int]] = []
        checked = 0
        try:
            candidates = await trio.to_thread.run_sync(self._list_tree, progress, limiter=self.limiter)
            batches = [candidates[i : i + SCAN_BATCH] for i in range(0, len(candidates), SCAN_BATCH)]
            pending = iter(batches)

            async def check_batches() -> None:
                nonlocal checked
                for batch in pending:
                    objects, removed = await trio.to_thread.run_sync(
                        self._check_files, batch, limiter=self.limiter
                    )
                    found.extend(objects)
                    self.invalid_removed += removed
                    checked += len(batch)
                    progress.update(checked, len(candidates))

            async with trio.open_nursery() as nursery:
                for _ in range(min(int(self.limiter.total_tokens), len(batches))):
                    nursery.start_soon(check_batches)
        finally:
            progress.finish()
        for key, size in found:
            yield key, size

    def _list_tree(self, progress: ScanProgress) -> list[tuple[str, str, codec.ParsedName]]:
        """Walk the root (in a thread): remove stale temp files, count foreign ones, and
        return (path, name, parsed name) of every file named like an object."""
        if not self._check_root():
            return []
        candidates = []
        foreign = temps = 0

        def walk_error(exc: OSError) -> None:
            log.warning("%s: cannot list %s: %s", self.name, exc.filename, exc)

        for directory, _dirs, filenames in os.walk(self.root, onerror=walk_error):
            relative = os.path.relpath(directory, self.root)
            for filename in filenames:
                path = os.path.join(directory, filename)
                if filename.startswith(TEMP_PREFIX):
                    try:
                        if path not in self._writing and _unlink_quietly(path):
                            temps += 1
                    except OSError as exc:
                        log.warning("%s: cannot remove stale %s: %s", self.name, path, exc)
                    continue
                name = filename if relative == "." else f"{relative}/{filename}"
                parsed = codec.parse_name(name)
                if parsed is None:
                    foreign += 1
                    log.debug("%s: skipping foreign file %s", self.name, path)
                else:
                    candidates.append((path, name, parsed))
            progress.update(len(candidates) + foreign, None)
        if foreign:
            log.warning("%s: skipped %d files under %s that are not objects", self.name, foreign, self.root)
        self.foreign_files, self.temps_removed = foreign, self.temps_removed + temps
        return candidates

    def _check_root(self) -> bool:
        """Create the root and note (for ``health``) whether it is writable and has space;
        False if it cannot be a directory (nothing to scan)."""
        self._problem = None
        try:
            os.makedirs(self.root, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                self._problem = ("unwritable", f"{self.root} is not writable")
            elif os.statvfs(self.root).f_bavail == 0:
                self._problem = ("disk-full", f"no space left under {self.root}")
        except OSError as exc:
            self._problem = ("unwritable", f"cannot write under {self.root}: {exc}")
        if self._problem is not None:
            log.error("%s: %s", self.name, self._problem[1])
        return os.path.isdir(self.root)

    def _check_files(
        self, batch: Sequence[tuple[str, str, codec.ParsedName]]
    ) -> tuple[list[tuple[ObjectKey, int]], int]:
        """Check the header and size of each file (in a thread): (valid objects, invalid removed)."""
        objects, removed = [], 0
        for path, name, parsed in batch:
            checked = self._check_file(path, name, parsed)
            if isinstance(checked, str):
                removed += 1
                log.warning("%s: removed invalid %s: %s", self.name, path, checked)
            elif checked is not None:
                objects.append(checked)
        return objects, removed

    def _check_file(
        self, path: str, name: str, parsed: codec.ParsedName
    ) -> tuple[ObjectKey, int] | str | None:
        """(key, payload size) of a valid object; the reason an invalid one was removed;
        None for a file that vanished or could not be read (left alone)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: cannot open %s: %s", self.name, path, exc)
            return None
        try:
            try:
                header = _read_header(fd, None)
                key = parsed.key if parsed.key is not None else fs_format.stored_key(header)
            except fs_format.HeaderError as exc:
                problem: str | None = str(exc)
            else:
                problem = fs_format.mismatch(header, file_size=os.fstat(fd).st_size, key=key)
                if problem is None and codec.object_name(key) != name:
                    problem = f"stores the key record of {key}, which has another name"
            if problem is None:
                return key, header.payload_len
            _remove_invalid(path, fd)
            return problem
        except OSError as exc:
            log.warning("%s: cannot read %s: %s", self.name, path, exc)
            return None
        finally:
            os.close(fd)

    # ------------------------------------------------------------ O_DIRECT

    def _open(self, path: str, flags: int) -> tuple[int, bool]:
        """Open ``path``; with O_DIRECT while it is on. Returns (fd, whether direct)."""
        if self.o_direct:
            try:
                return os.open(path, flags | _O_DIRECT, 0o644), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refuse_direct(exc)
                if flags & os.O_CREAT:
                    _unlink_quietly(path)  # some kernels create the file before refusing the flag
        return os.open(path, flags, 0o644), False

    def _refuse_direct(self, exc: OSError) -> None:
        with self._direct_lock:
            if self.o_direct:
                self.o_direct = False
                log.warning(
                    "%s: the filesystem under %s refuses O_DIRECT (%s); using buffered I/O",
                    self.name,
                    self.root,
                    exc,
                )


class ScanProgress:
    """Progress of a long recovery scan on the console, silent for its first ``delay``
    seconds: a bar redrawn in place when ``stream`` (stderr) is a terminal, else a log
    line every ``log_every`` seconds. Thread-safe (the scan's threads report through it)."""

    WIDTH = 30

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        delay: float = 1.0,
        redraw_every: float = 0.1,
        log_every: float = 5.0,
    ) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._clock = clock
        self._start = clock()
        self._delay = delay
        self._every = redraw_every if self._tty else log_every
        self._last_shown: float | None = None
        self._last: tuple[int, int | None] = (0, None)
        self._lock = threading.Lock()

    def update(self, done: int, total: int | None) -> None:
        """``done`` files of ``total`` (None while the total is still being counted)."""
        with self._lock:
            self._last = (done, total)
            now = self._clock()
            if now - self._start < self._delay:
                return
            if self._last_shown is not None and now - self._last_shown < self._every:
                return
            self._last_shown = now
            self._show(done, total, now)

    def finish(self) -> None:
        """Show the final state (only if anything was shown) and end the line."""
        with self._lock:
            if self._last_shown is None:
                return
            self._show(*self._last, self._clock())
            if self._tty:
                self.stream.write("\n")
                self.stream.flush()

    def _show(self, done: int, total: int | None, now: float) -> None:
        elapsed = f"{now - self._start:.0f} s"
        if total is None:
            text = f"{self.label}: {done} files listed ({elapsed})"
        else:
            filled = self.WIDTH * done // max(total, 1)
            percent = 100 * done // max(total, 1)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            text = f"{self.label}: [{bar}] {percent:3d}% {done}/{total} files ({elapsed})"
        if self._tty:
            self.stream.write(f"\r{text}\x1b[K")  # redraw in place, clearing what was longer
            self.stream.flush()
        else:
            log.info("%s", text)


# ------------------------------------------------------------ blocking helpers (worker threads)


def _bytes_view(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _bounce_buffer() -> memoryview:
    """This thread's page-aligned buffer for O_DIRECT transfers."""
    buffer: memoryview | None = getattr(_thread_state, "bounce", None)
    if buffer is None:
        buffer = _thread_state.bounce = memoryview(mmap.mmap(-1, DIRECT_CHUNK))
    return buffer


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (resuming after short writes)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _pwrite(fd: int, data: memoryview, offset: int, bounce: memoryview | None) -> None:
    """Write ``data`` at ``offset``. With ``bounce`` (O_DIRECT; ``offset`` aligned), copy
    it through that aligned buffer and write aligned lengths, padding the last one."""
    if bounce is None:
        _pwrite_all(fd, data, offset)
        return
    for lo in range(0, len(data), len(bounce)):
        piece = data[lo : lo + len(bounce)]
        bounce[: len(piece)] = piece
        _pwrite_all(fd, bounce[: fs_format.round_up(len(piece))], offset + lo)


def _pread_into(fd: int, target: memoryview, offset: int, bounce: memoryview | None) -> int:
    """Read up to ``len(target)`` bytes at ``offset``; short only at the end of the file.
    With ``bounce`` (O_DIRECT), reads aligned lengths into it and copies out."""
    done = 0
    while done < len(target):
        if bounce is None:
            count = os.preadv(fd, [target[done:]], offset + done)
        else:
            want = min(len(bounce), len(target) - done)
            count = min(want, os.preadv(fd, [bounce[: fs_format.round_up(want)]], offset + done))
            target[done : done + count] = bounce[:count]
        if count == 0:
            break
        done += count
    return done


def _read_header(fd: int, bounce: memoryview | None) -> fs_format.FileHeader:
    probe = bytearray(fs_format.HEADER_PROBE)
    got = _pread_into(fd, memoryview(probe), 0, bounce)
    header_len = fs_format.header_length(memoryview(probe)[:got])
    if header_len > got:
        probe = bytearray(header_len)
        got = _pread_into(fd, memoryview(probe), 0, bounce)
    return fs_format.decode_header(memoryview(probe)[:got])


def _read_verified(
    fd: int,
    header: fs_format.FileHeader,
    buffer: memoryview,
    lo: int,
    hi: int,
    bounce: memoryview | None,
) -> str | None:
    """Read payload bytes ``[lo, hi)`` (whole segments) into ``buffer`` and verify each
    segment right after reading it, while it is still in the CPU cache. None if all match."""
    for start in range(lo, hi, header.segment_size):
        view = buffer[start : min(start + header.segment_size, hi)]
        if _pread_into(fd, view, header.header_len + start, bounce) != len(view):
            return f"truncated in payload segment {start // header.segment_size}"
        if fs_format.checksum(view) != header.checksums[start // header.segment_size]:
            return f"checksum mismatch in payload segment {start // header.segment_size}"
    return None


def _remove_invalid(path: str, fd: int) -> None:
    """Unlink ``path`` if it is still the file open as ``fd`` (not a fresh put's file)."""
    opened = os.fstat(fd)
    try:
        current = os.stat(path)
        if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_quietly(path: str) -> bool:
    """Remove ``path`` if it is there; True if it was."""
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _unlink_all(paths: Sequence[str]) -> None:
    for path in paths:
        _unlink_quietly(path)


def _files_exist(paths: Sequence[str]) -> list[bool]:
    exists = []
    for path in paths:
        try:
            exists.append(stat.S_ISREG(os.stat(path).st_mode))
        except (FileNotFoundError, NotADirectoryError):
            exists.append(False)
    return exists
