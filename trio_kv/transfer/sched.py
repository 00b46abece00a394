"""The Linux scheduler's time slice of a thread (EEVDF, kernel 6.12 and later).

On 2 cores with both busy copying, the event loop's thread woke from ``epoll_wait`` up to
5 ms late: the kernel let the running copy thread finish its slice (1.4 ms by default, more
with a few of them) before the loop's turn. Neither a lower copy-thread priority (nice 0, 5,
15: the same lag) nor a shorter GIL switch interval (0.5 ms: the same) changed that. A thread
that asks for a short slice gets an early deadline and preempts a longer-slice thread when
it wakes, with its share of the CPU unchanged: the loop asks for ``loop_slice_us``, copy
threads for the default (docs/benchmarks.md#hot-path).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(platform.machine())


class _SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


def set_thread_slice(slice_ns: int) -> bool:
    """Ask the kernel for ``slice_ns`` time slices for the calling thread (0: the default),
    keeping its policy (SCHED_OTHER) and nice value. False where this kernel or machine
    cannot be asked (older kernels take the call and ignore the slice; that is fine)."""
    if _SYS_SCHED_SETATTR is None or os.sched_getscheduler(0) != os.SCHED_OTHER:
        return False
    attr = _SchedAttr()
    attr.size = ctypes.sizeof(attr)
    attr.sched_policy = os.SCHED_OTHER
    attr.sched_nice = os.getpriority(os.PRIO_PROCESS, 0)
    attr.sched_runtime = slice_ns
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.syscall(_SYS_SCHED_SETATTR, 0, ctypes.byref(attr), 0) == 0)


def thread_slice_ns() -> int | None:
    """The calling thread's slice as the kernel reports it (/proc), or None if it does not."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/sched") as sched:
            for line in sched:
                if line.startswith("se.slice"):
                    return int(float(line.split(":")[1]))
    except (OSError, ValueError):
        pass
    return None
