"""Transfer layer: moves KV bytes between an engine's KV cache and the L1 arena.

The CPU backend works on shared-memory tensors and needs no GPU.
"""

from __future__ import annotations

from .cpu import CopyJob, CpuTransfer, MappedKVCache
from .layout import KVLayout, plan_layout

__all__ = ["CopyJob", "CpuTransfer", "KVLayout", "MappedKVCache", "plan_layout", "select_backend"]


def select_backend(name: str = "auto", *, threads: int = 2, shm_dir: str = "/dev/shm") -> CpuTransfer:
    """The transfer backend to use. Only "cpu" exists so far; "auto" picks it."""
    if name not in ("auto", "cpu"):
        raise ValueError(f"unknown transfer backend {name!r}; available: auto, cpu")
    return CpuTransfer(threads=threads, shm_dir=shm_dir)
