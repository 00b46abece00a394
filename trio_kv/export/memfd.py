"""Sealed memfd regions: CPU KV memory an engine shares with the server, safe from SIGBUS.

A server that maps a plain shared file dies of SIGBUS if the file's owner
truncates it. A memfd sealed with ``F_SEAL_SHRINK`` can never shrink, so a
mapping of it can never fault that way. The engine creates the region
(``create_sealed_region``) and registers it by its ``/proc/<pid>/fd/<fd>``
path; the server opens that path, checks the seal (``open_sealed_region``) and
maps its own descriptor. The memory has no name in any filesystem: it is freed
once the engine's descriptor is closed (or the engine dies) and the server has
unmapped it.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import stat
from dataclasses import dataclass, field

import torch

from ..errors import ErrorCode, TrioKVError

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK
_PROC_FD = re.compile(r"/proc/([1-9][0-9]*)/fd/([0-9]+)")


@dataclass
class SealedRegion:
    """``nbytes`` of zeroed shared memory in a memfd that cannot shrink, mapped as ``tensor``."""

    fd: int
    nbytes: int
    tensor: torch.Tensor = field(repr=False)  # int8, flat; keeps the mapping alive
    pid: int = field(default_factory=os.getpid)

    @property
    def path(self) -> str:
        """The path a server on this host opens to map the same memory."""
        return f"/proc/{self.pid}/fd/{self.fd}"

    def close(self) -> None:
        """Close the descriptor (idempotent). The mapping lives on while ``tensor`` does."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def create_sealed_region(nbytes: int, name: str = "trio-kv") -> SealedRegion:
    """A new zero-filled region of ``nbytes`` in a memfd sealed against shrinking."""
    if nbytes < 1:
        raise ValueError(f"a sealed region needs at least one byte, not {nbytes}")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        tensor = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.int8)
    except BaseException:
        os.close(fd)
        raise
    return SealedRegion(fd, nbytes, tensor)


def sealed_path_owner(path: str) -> int | None:
    """The pid in a ``/proc/<pid>/fd/<fd>`` path, or None for any other path."""
    match = _PROC_FD.fullmatch(path)
    return int(match.group(1)) if match else None


@dataclass
class OpenedRegion:
    """A verified sealed region as the server maps it, with a pidfd of the process that owns it."""

    tensor: torch.Tensor  # uint8, ``nbytes`` long
    owner_pid: int
    owner_pidfd: int  # readable once the owner exits; the caller closes it


def open_sealed_region(path: str, nbytes: int, owner_uid: int | None = None) -> OpenedRegion:
    """Open and map an engine's sealed region after checking its seals and size.

    Raises BAD_REGISTRATION for anything that is not a live process's memfd sealed
    against shrinking and at least ``nbytes`` long, PERMISSION_DENIED for a memfd not
    owned by ``owner_uid`` (when given).
    """
    pid = sealed_path_owner(path)
    if pid is None:
        raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"{path!r} is not a /proc/<pid>/fd/<fd> path")
    try:
        # The pidfd first: if it still names a live process after the open below, the
        # descriptor we opened belonged to that process and not to a reuse of its pid.
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"process {pid} of {path!r}: {exc.strerror}") from None
    try:
        fd = _open_fd(path)
        try:
            if _has_exited(pidfd):
                raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"process {pid} exited during registration")
            tensor = _map_verified(fd, path, nbytes, owner_uid)
        finally:
            os.close(fd)
    except BaseException:
        os.close(pidfd)
        raise
    return OpenedRegion(tensor, pid, pidfd)


def _open_fd(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"cannot open {path!r}: {exc.strerror}") from None


def check_file_owner(info: os.stat_result, path: str, owner_uid: int | None) -> None:
    """Refuse (PERMISSION_DENIED) a file whose owner is not ``owner_uid``; None checks nothing."""
    if owner_uid is not None and info.st_uid != owner_uid:
        raise TrioKVError(
            ErrorCode.PERMISSION_DENIED,
            f"{path!r} belongs to uid {info.st_uid}, not to the registering peer (uid {owner_uid})",
        )


def _map_verified(fd: int, path: str, nbytes: int, owner_uid: int | None) -> torch.Tensor:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"{path!r} is not a memory file")
    check_file_owner(info, path, owner_uid)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # a file that does not support sealing
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise TrioKVError(
            ErrorCode.BAD_REGISTRATION,
            f"{path!r} is not sealed against shrinking (F_SEAL_SHRINK); create it with "
            "trio_kv.export.memfd.create_sealed_region",
        )
    if nbytes < 1 or nbytes > info.st_size:
        raise TrioKVError(
            ErrorCode.BAD_REGISTRATION, f"declared {nbytes} bytes but {path!r} holds {info.st_size}"
        )
    # Map our own descriptor, not the path again: the path could name another file by now.
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)


def _has_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
