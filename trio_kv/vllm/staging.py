"""Staging: KV tensors in private memory, shared through a mirror the worker copies blocks across.

The fallback for a CPU KV cache that is not in shared memory (vLLM allocated it
some other way than ``shared_alloc`` expects). The mirror holds a contiguous
copy of every KV tensor in one sealed memfd; the server sees only the mirror.
Before a store the worker copies the store's blocks into the mirror; after a
retrieve it copies the blocks the server filled back into vLLM's tensors. This
costs one extra copy each way and the mirror's memory; never a wrong block,
since each block is copied only by the request that owns it at that time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..export.memfd import SealedRegion, create_sealed_region
from ..export.shm import dtype_name
from ..protocol import RegisterKVCache, TensorSpec

_ALIGN = 4096


class StagingMirror:
    """Shared contiguous copies of ``tensors`` (each indexed by blocks along ``block_dims[i]``)."""

    def __init__(self, tensors: Sequence[torch.Tensor], block_dims: Sequence[int]) -> None:
        offsets, cursor = [], 0
        for tensor in tensors:
            offsets.append(cursor)
            cursor += (tensor.numel() * tensor.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN
        self.region: SealedRegion = create_sealed_region(cursor, name="trio-kv-vllm-staging")
        self.sources = list(tensors)
        self.block_dims = list(block_dims)
        self.mirrors: list[torch.Tensor] = []
        self.specs: list[TensorSpec] = []
        for tensor, offset, dim in zip(tensors, offsets, block_dims):
            nbytes = tensor.numel() * tensor.element_size()
            mirror = self.region.tensor[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            self.mirrors.append(mirror)
            self.specs.append(
                TensorSpec(offset, dtype_name(tensor.dtype), list(mirror.shape), list(mirror.stride()), dim)
            )

    def registration(self, instance_id: str, block_size: int) -> RegisterKVCache:
        return RegisterKVCache(
            instance_id=instance_id,
            block_size=block_size,
            tensors=list(self.specs),
            shm_path=self.region.path,
            shm_bytes=self.region.nbytes,
        )

    def copy_out(self, block_ids: Sequence[int]) -> None:
        """vLLM's blocks -> the mirror (before a store reads them)."""
        if block_ids:
            index = torch.tensor(list(block_ids), dtype=torch.long)
            for source, mirror, dim in zip(self.sources, self.mirrors, self.block_dims):
                mirror.index_copy_(dim, index, source.index_select(dim, index))

    def copy_in(self, block_ids: Sequence[int]) -> None:
        """The mirror -> vLLM's blocks (after a retrieve filled them)."""
        if block_ids:
            index = torch.tensor(list(block_ids), dtype=torch.long)
            for source, mirror, dim in zip(self.sources, self.mirrors, self.block_dims):
                source.index_copy_(dim, index, mirror.index_select(dim, index))

    def close(self) -> None:
        self.region.close()
