"""Transfer layer: moves KV bytes between an engine's KV cache and the L1 arena.

The CPU backend works on shared-memory tensors and needs no GPU. The CUDA
backend (``cuda.py``) copies between CUDA IPC-mapped KV caches and a pinned L1
arena, and serves shared-memory registrations through the CPU path too.
Importing this package imports neither cuda-python nor the CUDA driver: the
CUDA backend is loaded when ``select_backend`` asks for it, so a server
installed without the ``[cuda]`` extra runs the CPU path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .cpu import CopyJob, CpuTransfer, MappedKVCache
from .layout import KVLayout, plan_layout

if TYPE_CHECKING:
    import torch

    from .cuda import CudaTransfer

__all__ = [
    "BACKENDS",
    "CopyJob",
    "CpuTransfer",
    "CudaTransfer",
    "CudaUnavailable",
    "KVLayout",
    "MappedKVCache",
    "arena_pinner",
    "plan_layout",
    "select_backend",
]

BACKENDS = ("auto", "cpu", "cuda")
log = logging.getLogger(__name__)


class CudaUnavailable(RuntimeError):
    """``transfer = "cuda"`` was asked for on a host without a usable CUDA device or driver."""


def __getattr__(name: str) -> Any:
    if name == "CudaTransfer":  # imported on first use: it needs cuda-python
        from .cuda import CudaTransfer

        return CudaTransfer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def select_backend(
    name: str = "auto", *, threads: int = 2, shm_dir: str = "/dev/shm", copy_timeout_s: float = 30.0
) -> CpuTransfer:
    """The transfer backend to use: "cpu", "cuda", or "auto" (cuda when cuda-python, a device
    and a recent enough driver are present, else cpu, saying why in the log). "cuda" without
    them raises CudaUnavailable. ``copy_timeout_s``: how long a CUDA copy waits for the
    engine's event."""
    if name not in BACKENDS:
        raise ValueError(f"unknown transfer backend {name!r}; available: {', '.join(BACKENDS)}")
    if name == "cpu":
        return CpuTransfer(threads=threads, shm_dir=shm_dir)
    try:
        from .cuda import CudaTransfer, driver_status
    except ImportError as exc:
        if name == "cuda":
            raise CudaUnavailable(
                f"transfer backend 'cuda' cannot start: {exc} (install the extra: pip install 'trio-kv[cuda]')"
            ) from None
        log.info("transfer auto: using cpu (cuda-python is not installed: %s)", exc)
        return CpuTransfer(threads=threads, shm_dir=shm_dir)
    reason = driver_status()
    if name == "cuda" or reason is None:
        try:
            return CudaTransfer(threads=threads, shm_dir=shm_dir, copy_timeout_s=copy_timeout_s)
        except Exception as exc:
            if name == "cuda":
                if isinstance(exc, CudaUnavailable):
                    raise
                raise CudaUnavailable(f"transfer backend 'cuda' cannot start: {exc}") from exc
            log.warning("a CUDA device is present but the cuda backend failed (%s); using cpu", exc)
    else:
        log.info("transfer auto: using cpu (%s)", reason)
    return CpuTransfer(threads=threads, shm_dir=shm_dir)


def arena_pinner(backend: CpuTransfer) -> Callable[[torch.Tensor], None] | None:
    """What page-locks the L1 arena for ``backend`` (``L1Store(pin=...)``); None for the CPU path."""
    pin: Callable[[torch.Tensor], None] | None = getattr(backend, "pin_host", None)
    return pin
