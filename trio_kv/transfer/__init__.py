"""Transfer layer: moves KV bytes between an engine's KV cache and the L1 arena.

The CPU backend works on shared-memory tensors and needs no GPU. The CUDA
backend (``cuda.py``) copies between CUDA IPC-mapped KV caches and a pinned L1
arena, and serves shared-memory registrations through the CPU path too.
Importing this package never touches the CUDA driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .cpu import CopyJob, CpuTransfer, MappedKVCache
from .cuda import CudaTransfer, CudaUnavailable, driver_status
from .layout import KVLayout, plan_layout

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


def select_backend(name: str = "auto", *, threads: int = 2, shm_dir: str = "/dev/shm") -> CpuTransfer:
    """The transfer backend to use: "cpu", "cuda", or "auto" (cuda when a device and a
    recent enough driver are present, else cpu). "cuda" without them raises CudaUnavailable."""
    if name not in BACKENDS:
        raise ValueError(f"unknown transfer backend {name!r}; available: {', '.join(BACKENDS)}")
    if name == "cuda" or (name == "auto" and driver_status() is None):
        try:
            return CudaTransfer(threads=threads, shm_dir=shm_dir)
        except Exception as exc:
            if name == "cuda":
                if isinstance(exc, CudaUnavailable):
                    raise
                raise CudaUnavailable(f"transfer backend 'cuda' cannot start: {exc}") from exc
            log.warning("a CUDA device is present but the cuda backend failed (%s); using cpu", exc)
    return CpuTransfer(threads=threads, shm_dir=shm_dir)


def arena_pinner(backend: CpuTransfer) -> Callable[[torch.Tensor], None] | None:
    """What page-locks the L1 arena for ``backend`` (``L1Store(pin=...)``); None for the CPU path."""
    return backend.pin_host if isinstance(backend, CudaTransfer) else None
