"""Non-temporal stores for large copies: glibc's threshold, set before the process starts.

glibc's ``memcpy`` writes through the caches (each destination line read for ownership first)
below ``glibc.cpu.x86_non_temporal_threshold`` and streams past the caches above it. The
threshold defaults to 3/4 of the shared cache a thread may use, so on a host whose CPU reports a
large L3 (480 MiB on this project's VMs: 190 MiB) no copy of a KV chunk ever streams. KV bytes
copied into L1 or out to an engine are not read again by this process soon, and a copy is
memory-bound: measured here, 2 threads copying 512 KiB pieces 11.3-11.8 -> 17.6-17.8 GB/s with
the threshold at 256 KiB, and ``bench cpu``'s store 9.4-10.1 -> 14.6-15.8 GB/s.

The threshold is a glibc *tunable*, read only when a process starts (``GLIBC_TUNABLES``), so
``trio-kv serve`` replaces itself once with the same command and the tunable added
(``exec_with_threshold``): same pid, same file descriptors. An operator's own setting of that
tunable is kept, and ``copy_nt_threshold = 0`` leaves glibc's default. Only on Linux x86-64 with
glibc, and only for a process started as ``trio-kv`` (never one that imported the CLI).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.cpu.x86_non_temporal_threshold"
DEFAULT_THRESHOLD = 256 * 1024
MIN_THRESHOLD = 64 * 1024  # glibc refuses less than 0x4040; below 64 KiB a copy is cache-sized


def tunables_with(current: str, threshold: int) -> str | None:
    """``GLIBC_TUNABLES`` with the threshold added to ``current``'s settings, or None where
    ``current`` sets it already (the operator's choice, or this process's first start)."""
    settings = [setting for setting in current.split(":") if setting]
    if any(setting.split("=", 1)[0] == TUNABLE for setting in settings):
        return None
    return ":".join([*settings, f"{TUNABLE}={threshold}"])


def active_threshold(environ: Mapping[str, str] = os.environ) -> int:
    """The threshold this process's ``GLIBC_TUNABLES`` sets (bytes; 0: glibc's own default)."""
    for setting in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = setting.partition("=")
        if name == TUNABLE:
            try:
                return int(value, 0)
            except ValueError:
                return 0
    return 0


def supported() -> bool:
    """Whether glibc on this machine reads the tunable (Linux, x86-64, glibc)."""
    return (
        sys.platform == "linux"
        and platform.machine() in ("x86_64", "AMD64")
        and platform.libc_ver()[0] == "glibc"
    )


def started_as_trio_kv(argv: list[str] | None = None) -> bool:
    """Whether this process is the ``trio-kv`` command (console script or ``-m trio_kv``)."""
    argv = sys.argv if argv is None else argv
    program = argv[0] if argv else ""
    return os.path.basename(program) == "trio-kv" or program.endswith(os.path.join("trio_kv", "__main__.py"))


def exec_with_threshold(threshold: int) -> None:
    """Replace this process by the same command with the threshold set; return at once where
    there is nothing to do (``threshold`` 0, set already, unsupported, not ``trio-kv``)."""
    if threshold <= 0 or not supported() or not started_as_trio_kv():
        return
    tunables = tunables_with(os.environ.get("GLIBC_TUNABLES", ""), threshold)
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})
    except OSError as exc:  # the copies only lose speed: go on as this process is
        print(f"trio-kv: copies keep glibc's default threshold ({exc})", file=sys.stderr)
