"""A block pool with prefix caching, shaped like vLLM's, for the simulated engine.

Blocks hold ``block_size`` tokens. A full block whose KV is computed is
registered under a hash of its tokens chained with the previous block's hash
(the first one also with the request's cache salt, as vLLM does), so a later
request with the same prefix reuses it. Freed blocks stay cached until the
pool hands them out again, least recently freed first; a request's blocks are
freed tail first, so its head blocks stay cached longest.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(tokens: Sequence[int], block_size: int, cache_salt: str | None) -> list[bytes]:
    """Chained hashes of the full blocks of ``tokens``."""
    hashes = []
    previous = hashlib.blake2b((cache_salt or "").encode(), digest_size=16).digest()
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(b"".join(t.to_bytes(4, "little") for t in tokens[start : start + block_size]))
        previous = digest.digest()
        hashes.append(previous)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict((block, None) for block in range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._cached: dict[bytes, int] = {}

    def num_free(self) -> int:
        return len(self._free)

    def computed_blocks(self, tokens: Sequence[int], cache_salt: str | None) -> list[int]:
        """Cached blocks holding the longest prefix of ``tokens``, leaving the last token to compute."""
        if not self.prefix_caching:
            return []
        blocks = []
        for block_hash in block_hashes(tokens[: len(tokens) - 1], self.block_size, cache_salt):
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference to cached blocks (a prefix-cache hit)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1

    def allocate(self, count: int) -> list[int] | None:
        """``count`` fresh blocks, evicting the least recently freed; None if there are too few."""
        if count > len(self._free):
            return None
        blocks = []
        for _ in range(max(count, 0)):
            block, _ = self._free.popitem(last=False)
            stale = self._hash_of.pop(block, None)
            if stale is not None:
                del self._cached[stale]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def evict(self, blocks: Sequence[int]) -> None:
        """Forget that ``blocks`` hold cached KV (vLLM's ``KVCacheManager.evict_blocks``)."""
        for block in blocks:
            block_hash = self._hash_of.pop(block, None)
            if block_hash is not None:
                del self._cached[block_hash]

    def cache(
        self, tokens: Sequence[int], cache_salt: str | None, blocks: Sequence[int], computed: int
    ) -> None:
        """Register the full blocks of ``tokens[:computed]`` (their KV is valid) for reuse."""
        if not self.prefix_caching:
            return
        usable = tokens[: computed // self.block_size * self.block_size]
        for block_hash, block in zip(block_hashes(usable, self.block_size, cache_salt), blocks):
            if block_hash not in self._cached and block not in self._hash_of:
                self._cached[block_hash] = block
                self._hash_of[block] = block_hash
