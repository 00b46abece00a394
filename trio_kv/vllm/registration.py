"""Describe a vLLM worker's KV tensors as a ``RegisterKVCache`` message.

CUDA tensors are exported with CUDA IPC (``trio_kv.export.ipc``): the server maps
the engine's device allocations and waits on an interprocess event the engine
records before each store and retrieve.

On the CPU path the server copies blocks straight out of the engine's memory,
so the KV tensors must live in one shared-memory file (``MAP_SHARED``, e.g.
made with ``trio_kv.export.shm.create_shared_tensors`` or ``torch.from_file(...,
shared=True)``). Which file, and where in it, is read from ``/proc/self/maps``:
the tensors need no wrapper type, only the right memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..export.shm import dtype_name
from ..protocol import RegisterKVCache, TensorSpec

if TYPE_CHECKING:
    from ..export.ipc import CudaKVCacheExport


class FileMapping(NamedTuple):
    """One line of /proc/<pid>/maps that maps a file."""

    start: int
    end: int
    file_offset: int
    shared: bool
    path: str


def parse_maps(lines: Iterable[str]) -> list[FileMapping]:
    """The file mappings in the text of ``/proc/<pid>/maps`` (anonymous mappings are left out)."""
    mappings = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        mappings.append(
            FileMapping(start, end, int(parts[2], 16), parts[1][3:4] == "s", parts[5].rstrip("\n"))
        )
    return mappings


def block_dim(shape: Sequence[int], num_blocks: int) -> int:
    """The dimension of a KV tensor that indexes blocks.

    vLLM's layouts put it first (FlashInfer, MLA, cross-layer: ``(num_blocks, ...)``)
    or second (FlashAttention and the CPU backends: ``(2, num_blocks, ...)``).
    """
    candidates = [dim for dim in (0, 1) if dim < len(shape) and shape[dim] == num_blocks]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"KV tensor of shape {tuple(shape)} has no dimension of size num_blocks={num_blocks} "
            "in the first two places; trio-kv does not know this layout"
        )
    raise ValueError(
        f"cannot tell which dimension of a KV tensor of shape {tuple(shape)} indexes its "
        f"{num_blocks} blocks; use more than {num_blocks} blocks"
    )


def kv_cache_registration(
    instance_id: str,
    kv_caches: Mapping[str, torch.Tensor],
    *,
    block_size: int,
    num_blocks: int,
    maps: Sequence[FileMapping] | None = None,
) -> RegisterKVCache:
    """The RegisterKVCache message for CPU ``kv_caches`` (layer name -> tensor, in layer order).

    Raises ValueError for tensors that are not in one shared file mapping.
    Layers that share one tensor (KV sharing) are registered once.
    """
    tensors = distinct_tensors(kv_caches.values())
    if not tensors:
        raise ValueError("no KV cache tensors to register")
    for tensor in tensors:
        if tensor.device.type != "cpu":
            raise NotImplementedError(f"trio-kv cannot register KV caches on {tensor.device.type} devices")
    if maps is None:
        with open("/proc/self/maps") as maps_file:
            maps = parse_maps(maps_file)
    path = None
    specs = []
    for tensor in tensors:
        name = next(layer for layer, t in kv_caches.items() if t is tensor)
        mapping = _mapping_of(tensor, maps, name)
        if path is None:
            path = mapping.path
        elif mapping.path != path:
            raise ValueError(
                f"KV tensors live in two files ({path} and {mapping.path}); trio-kv registers one "
                "shared-memory file per worker"
            )
        specs.append(
            TensorSpec(
                offset=tensor.data_ptr() - mapping.start + mapping.file_offset,
                dtype=dtype_name(tensor.dtype),
                shape=list(tensor.shape),
                strides=list(tensor.stride()),
                block_dim=block_dim(tensor.shape, num_blocks),
            )
        )
    assert path is not None
    return RegisterKVCache(
        instance_id=instance_id,
        block_size=block_size,
        tensors=specs,
        shm_path=path,
        shm_bytes=os.stat(path).st_size,
    )


def cuda_kv_cache_export(
    kv_caches: Mapping[str, torch.Tensor], *, block_size: int, num_blocks: int
) -> CudaKVCacheExport:
    """Export CUDA ``kv_caches`` (all on one device) by CUDA IPC, with an interprocess event.

    Imports cuda-python's driver bindings; raises ValueError for a layout trio-kv
    does not know and for tensors whose block dimensions differ.
    """
    from ..export.ipc import CudaKVCacheExport

    tensors = distinct_tensors(kv_caches.values())
    if not tensors:
        raise ValueError("no KV cache tensors to register")
    dims = {block_dim(tensor.shape, num_blocks) for tensor in tensors}
    if len(dims) != 1:
        raise ValueError(f"KV tensors index blocks in different dimensions {sorted(dims)}; trio-kv needs one")
    return CudaKVCacheExport.from_tensors(tensors, dims.pop(), block_size)


def distinct_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` without repeats (layers that share one KV tensor), in first-seen order."""
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    distinct = []
    for tensor in tensors:
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity not in seen:
            seen.add(identity)
            distinct.append(tensor)
    return distinct


def _mapping_of(tensor: torch.Tensor, maps: Sequence[FileMapping], name: str) -> FileMapping:
    """The shared file mapping that holds every byte of ``tensor``."""
    first = tensor.data_ptr()
    reach = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()) if size > 0)
    last = first + (reach + 1) * tensor.element_size()
    for mapping in maps:
        if mapping.start <= first < mapping.end:
            if not mapping.shared:
                raise ValueError(f"KV tensor {name!r} is in a private mapping of {mapping.path}")
            if mapping.path.endswith(" (deleted)"):
                raise ValueError(f"KV tensor {name!r} is in a file that was unlinked: {mapping.path}")
            if last > mapping.end:
                raise ValueError(f"KV tensor {name!r} reaches past its mapping of {mapping.path}")
            return mapping
    raise ValueError(
        f"KV tensor {name!r} is not in a shared-memory file: on the CPU path trio-kv copies blocks "
        "straight out of the engine's memory, so the engine must allocate its KV cache in a file "
        "under the server's shm_dir (/dev/shm), e.g. with trio_kv.export.shm.create_shared_tensors"
    )
