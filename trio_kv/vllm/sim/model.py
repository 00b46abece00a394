"""A deterministic stand-in for a model's KV, for the simulated engine.

The KV of position ``p`` on worker ``rank`` is a pure function of the tokens
``[0, p]`` and the rank, as it is in a real transformer (each rank holding its
own shard). The simulated forward pass checks that every earlier position
holds exactly that KV before it writes the new positions, so a wrong, missing
or misplaced load shows up; a forward pass over wrong KV writes poison, so a
store of what it computed would show up in a later load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ...export.shm import SharedKVCache

_RANK_MIX = 0x9E3779B97F4A7C15


def extend_prefix_hashes(hashes: list[int], tokens: Sequence[int]) -> None:
    """Extend ``hashes`` (one per position) to cover every token of ``tokens``."""
    previous = hashes[-1].to_bytes(8, "little") if hashes else bytes(8)
    for token in tokens[len(hashes) :]:
        previous = hashlib.blake2b(previous + token.to_bytes(4, "little"), digest_size=8).digest()
        hashes.append(int.from_bytes(previous, "little"))


class SimModel:
    """Writes and checks per-position KV in the workers' shared-memory KV caches.

    Each cache must use the per-layer layout ``(2, num_blocks, block_size, kv_heads, head_size)``.
    """

    def __init__(self, kv_caches: Sequence[SharedKVCache]) -> None:
        for cache in kv_caches:
            for spec in cache.specs:
                if spec.block_dim != 1 or len(spec.shape) != 5:
                    raise ValueError("the simulated model needs the per-layer KV layout")
        self.kv_caches = list(kv_caches)
        first = kv_caches[0]
        self.block_size = first.block_size
        self._slot_shape = (len(first.tensors), 2, *first.tensors[0].shape[3:])
        self._dtype = first.tensors[0].dtype

    def expected(self, prefix_hashes: Sequence[int], rank: int) -> torch.Tensor:
        """The KV of each position, shaped (positions, layers, 2, kv_heads, head_size)."""
        slots = []
        for prefix_hash in prefix_hashes:
            generator = torch.Generator().manual_seed((prefix_hash ^ (rank * _RANK_MIX)) & (2**63 - 1))
            slots.append(torch.randn(self._slot_shape, generator=generator))
        if not slots:
            return torch.empty((0, *self._slot_shape), dtype=self._dtype)
        return torch.stack(slots).to(self._dtype)

    def write(
        self,
        rank: int,
        block_ids: Sequence[int],
        prefix_hashes: Sequence[int],
        start: int,
        end: int,
        *,
        poison: bool = False,
    ) -> None:
        """Write the KV of positions ``[start, end)`` (zeros if ``poison``)."""
        if end <= start:
            return
        values = self.expected(prefix_hashes[start:end], rank)
        if poison:
            values.zero_()
        blocks, slots = self._slots(block_ids, start, end)
        for layer, tensor in enumerate(self.kv_caches[rank].tensors):
            tensor[:, blocks, slots] = values[:, layer].transpose(0, 1)

    def holds(
        self, rank: int, block_ids: Sequence[int], prefix_hashes: Sequence[int], start: int, end: int
    ) -> bool:
        """Whether positions ``[start, end)`` hold exactly their KV."""
        if end <= start:
            return True
        values = self.expected(prefix_hashes[start:end], rank)
        blocks, slots = self._slots(block_ids, start, end)
        return all(
            torch.equal(tensor[:, blocks, slots], values[:, layer].transpose(0, 1))
            for layer, tensor in enumerate(self.kv_caches[rank].tensors)
        )

    def _slots(self, block_ids: Sequence[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, end)
        table = torch.tensor(list(block_ids), dtype=torch.long)
        return table[positions // self.block_size], positions % self.block_size
