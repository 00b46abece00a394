"""Blocking file I/O of the fs adapter; every function here runs in a worker thread.

* ``write_temp_file`` writes one object (payload, then its header) to a new temp file.
* ``read_object_part`` checks an object's header against the key and the expected
  length, then reads and verifies its whole segments of one part into the caller's
  buffer; an invalid file is removed.
* ``FileOpener`` opens files with O_DIRECT while it is on; bytes then move through
  an aligned per-thread bounce buffer. A filesystem that refuses O_DIRECT (EINVAL)
  turns it off with one warning.

Nothing here touches the ledger or other adapter state: outcomes are returned.
"""

from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
import secrets
import stat
import threading
from collections.abc import Sequence

from ..keys import ObjectKey
from . import codec, fs_format

log = logging.getLogger(__name__)

TEMP_PREFIX = ".trio-kv-tmp."
DIRECT_CHUNK = fs_format.SEGMENT_SIZE  # bounce buffer per thread for O_DIRECT: one segment
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_thread_state = threading.local()


class ReadOutcome(enum.Enum):
    HIT = "hit"
    MISSING = "missing"
    INVALID = "invalid"  # removed


def temp_path_for(path: str) -> str:
    """A fresh temp name in ``path``'s directory: what a put writes before its rename."""
    directory, filename = os.path.split(path)
    return os.path.join(directory, f"{TEMP_PREFIX}{filename}.{os.getpid()}.{secrets.token_hex(4)}")


class FileOpener:
    """Opens object files, with O_DIRECT while ``direct`` is true. ``label`` and ``root``
    name the adapter in the one warning logged when the filesystem refuses O_DIRECT."""

    def __init__(self, label: str, root: str, *, direct: bool) -> None:
        if direct and not _O_DIRECT:
            log.warning("%s: O_DIRECT is not available on this platform; using buffered I/O", label)
        self.label = label
        self.root = root
        self.direct = direct and bool(_O_DIRECT)  # whether O_DIRECT is (still) in use
        self._lock = threading.Lock()

    def open(self, path: str, flags: int) -> tuple[int, bool]:
        """Open ``path``; with O_DIRECT while it is on. Returns (fd, whether direct)."""
        if self.direct:
            try:
                return os.open(path, flags | _O_DIRECT, 0o644), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refuse_direct(exc)
                if flags & os.O_CREAT:
                    unlink_quietly(path)  # some kernels create the file before refusing the flag
        return os.open(path, flags, 0o644), False

    def _refuse_direct(self, exc: OSError) -> None:
        with self._lock:
            if self.direct:
                self.direct = False
                log.warning(
                    "%s: the filesystem under %s refuses O_DIRECT (%s); using buffered I/O",
                    self.label,
                    self.root,
                    exc,
                )


def write_temp_file(
    opener: FileOpener, temp: str, record: bytes, payload: memoryview, segment_size: int
) -> None:
    """Write payload and header to the new file ``temp`` (creating its directory if
    needed); removes it on failure. Each segment is hashed just before it is written,
    while it is in the CPU cache, and the header, which holds the checksums, is written last."""
    header_len = fs_format.header_size(len(record), len(payload), segment_size)
    try:
        fd, direct = opener.open(temp, _CREATE)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(temp), exist_ok=True)
        fd, direct = opener.open(temp, _CREATE)
    try:
        try:
            bounce = bounce_buffer() if direct else None
            checksums = []
            for lo in range(0, len(payload), segment_size):
                piece = payload[lo : lo + segment_size]
                checksums.append(fs_format.checksum(piece))
                pwrite(fd, piece, header_len + lo, bounce)
            header = fs_format.encode_header_with(record, len(payload), checksums, segment_size)
            pwrite(fd, memoryview(header), 0, bounce)
            if direct:
                os.ftruncate(fd, header_len + len(payload))  # drop the last write's padding
        finally:
            os.close(fd)
    except BaseException:
        unlink_quietly(temp)
        raise


def read_object_part(
    opener: FileOpener, path: str, key: ObjectKey, buffer: memoryview, part: int, parts: int
) -> tuple[ReadOutcome, str]:
    """Check the header of the object at ``path`` and read and verify part ``part`` of
    ``parts`` into ``buffer``. Returns the outcome and, for an invalid (removed) file, why;
    for a hit, the layout fingerprint its key record carries ("" if none)."""
    try:
        fd, direct = opener.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return ReadOutcome.MISSING, ""
    try:
        bounce = bounce_buffer() if direct else None
        try:
            header = read_header(fd, bounce)
        except fs_format.HeaderError as exc:
            problem: str | None = str(exc)
        else:
            size = os.fstat(fd).st_size
            problem = fs_format.mismatch(header, file_size=size, key=key, payload_len=len(buffer))
            if problem is None:
                lo, hi = fs_format.part_range(header.payload_len, header.segment_size, part, parts)
                problem = read_verified(fd, header, buffer, lo, hi, bounce)
        if problem is None:
            return ReadOutcome.HIT, codec.record_layout(header.key_record)
        remove_invalid(path, fd)
        return ReadOutcome.INVALID, problem
    finally:
        os.close(fd)


def bytes_view(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def bounce_buffer() -> memoryview:
    """This thread's page-aligned buffer for O_DIRECT transfers."""
    buffer: memoryview | None = getattr(_thread_state, "bounce", None)
    if buffer is None:
        buffer = _thread_state.bounce = memoryview(mmap.mmap(-1, DIRECT_CHUNK))
    return buffer


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (resuming after short writes)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def pwrite(fd: int, data: memoryview, offset: int, bounce: memoryview | None) -> None:
    """Write ``data`` at ``offset``. With ``bounce`` (O_DIRECT; ``offset`` aligned), copy
    it through that aligned buffer and write aligned lengths, padding the last one."""
    if bounce is None:
        pwrite_all(fd, data, offset)
        return
    for lo in range(0, len(data), len(bounce)):
        piece = data[lo : lo + len(bounce)]
        bounce[: len(piece)] = piece
        pwrite_all(fd, bounce[: fs_format.round_up(len(piece))], offset + lo)


def pread_into(fd: int, target: memoryview, offset: int, bounce: memoryview | None) -> int:
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


def read_header(fd: int, bounce: memoryview | None) -> fs_format.FileHeader:
    """Read and decode the header of the open file; raises fs_format.HeaderError."""
    probe = bytearray(fs_format.HEADER_PROBE)
    got = pread_into(fd, memoryview(probe), 0, bounce)
    header_len = fs_format.header_length(memoryview(probe)[:got])
    if header_len > got:
        probe = bytearray(header_len)
        got = pread_into(fd, memoryview(probe), 0, bounce)
    return fs_format.decode_header(memoryview(probe)[:got])


def read_verified(
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
        if pread_into(fd, view, header.header_len + start, bounce) != len(view):
            return f"truncated in payload segment {start // header.segment_size}"
        if fs_format.checksum(view) != header.checksums[start // header.segment_size]:
            return f"checksum mismatch in payload segment {start // header.segment_size}"
    return None


def remove_invalid(path: str, fd: int) -> None:
    """Unlink ``path`` if it is still the file open as ``fd`` (not a fresh put's file)."""
    opened = os.fstat(fd)
    try:
        current = os.stat(path)
        if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass


def unlink_quietly(path: str) -> bool:
    """Remove ``path`` if it is there; True if it was."""
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def unlink_all(paths: Sequence[str]) -> None:
    for path in paths:
        unlink_quietly(path)


def files_exist(paths: Sequence[str]) -> list[bool]:
    exists = []
    for path in paths:
        try:
            exists.append(stat.S_ISREG(os.stat(path).st_mode))
        except (FileNotFoundError, NotADirectoryError):
            exists.append(False)
    return exists
