"""The fs adapter's recovery scan at start, and its progress on the console.

``RecoveryScan`` walks the root in a worker thread: it removes stale temp files (a
crash mid-write) other than those of puts in flight, skips and counts files with
foreign names, and then checks the header and size of every object, SCAN_BATCH
files per thread call, as many batches at once as the adapter's limiter allows.
Invalid files are removed; payload checksums are verified later, on each read. A
scan longer than a second shows its progress (``ScanProgress``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Container, Sequence
from typing import TextIO

import trio

from ..keys import ObjectKey
from . import codec, fs_format
from .fs_io import TEMP_PREFIX, read_header, remove_invalid, unlink_quietly

log = logging.getLogger(__name__)

SCAN_BATCH = 256  # files checked per thread call during recovery

Candidate = tuple[str, str, codec.ParsedName]  # (path, name under the root, parsed name)


def check_root(root: str, create: bool = True) -> tuple[bool, tuple[str, str] | None]:
    """Create ``root`` if ``create`` (in a thread). Returns whether it is a directory (else
    there is nothing to scan) and, if it is missing, cannot be written or has no space,
    (state, reason)."""
    problem: tuple[str, str] | None = None
    if not create and not os.path.isdir(root):
        return False, ("missing", f"{root} does not exist (create it, or add ?create=true to the spec)")
    try:
        os.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            problem = ("unwritable", f"{root} is not writable")
        elif os.statvfs(root).f_bavail == 0:
            problem = ("disk-full", f"no space left under {root}")
    except OSError as exc:
        problem = ("unwritable", f"cannot write under {root}: {exc}")
    return os.path.isdir(root), problem


class RecoveryScan:
    """One scan of the directory ``root`` for the adapter named ``label``; ``keep`` holds
    the temp files of puts in flight, which are not stale. The counters say what the
    scan found: ``foreign_files``, ``temps_removed``, ``invalid_removed``."""

    def __init__(self, label: str, root: str, *, limiter: trio.CapacityLimiter, keep: Container[str]):
        self.label = label
        self.root = root
        self.limiter = limiter
        self.keep = keep
        self.foreign_files = 0
        self.temps_removed = 0
        self.invalid_removed = 0

    async def run(self) -> list[tuple[ObjectKey, int]]:
        """Every valid object under the root and its payload size. On cancellation the
        batches being checked finish in their threads first; nothing is returned."""
        progress = ScanProgress(f"{self.label}: recovery scan")
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
        return found

    def _list_tree(self, progress: ScanProgress) -> list[Candidate]:
        """Walk the root (in a thread): remove stale temp files, count foreign ones, and
        return every file named like an object."""
        candidates = []
        foreign = temps = 0

        def walk_error(exc: OSError) -> None:
            log.warning("%s: cannot list %s: %s", self.label, exc.filename, exc)

        for directory, _dirs, filenames in os.walk(self.root, onerror=walk_error):
            relative = os.path.relpath(directory, self.root)
            for filename in filenames:
                path = os.path.join(directory, filename)
                if filename.startswith(TEMP_PREFIX):
                    try:
                        if path not in self.keep and unlink_quietly(path):
                            temps += 1
                    except OSError as exc:
                        log.warning("%s: cannot remove stale %s: %s", self.label, path, exc)
                    continue
                name = filename if relative == "." else f"{relative}/{filename}"
                parsed = codec.parse_name(name)
                if parsed is None:
                    foreign += 1
                    log.debug("%s: skipping foreign file %s", self.label, path)
                else:
                    candidates.append((path, name, parsed))
            progress.update(len(candidates) + foreign, None)
        if foreign:
            log.warning("%s: skipped %d files under %s that are not objects", self.label, foreign, self.root)
        self.foreign_files, self.temps_removed = foreign, temps
        return candidates

    def _check_files(self, batch: Sequence[Candidate]) -> tuple[list[tuple[ObjectKey, int]], int]:
        """Check the header and size of each file (in a thread): (valid objects, invalid removed)."""
        objects, removed = [], 0
        for path, name, parsed in batch:
            checked = self._check_file(path, name, parsed)
            if isinstance(checked, str):
                removed += 1
                log.warning("%s: removed invalid %s: %s", self.label, path, checked)
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
            log.warning("%s: cannot open %s: %s", self.label, path, exc)
            return None
        try:
            try:
                header = read_header(fd, None)
                key = parsed.key if parsed.key is not None else fs_format.stored_key(header)
            except fs_format.HeaderError as exc:
                problem: str | None = str(exc)
            else:
                problem = fs_format.mismatch(header, file_size=os.fstat(fd).st_size, key=key)
                if problem is None and codec.object_name(key) != name:
                    problem = f"stores the key record of {key}, which has another name"
            if problem is None:
                return key, header.payload_len
            remove_invalid(path, fd)
            return problem
        except OSError as exc:
            log.warning("%s: cannot read %s: %s", self.label, path, exc)
            return None
        finally:
            os.close(fd)


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
