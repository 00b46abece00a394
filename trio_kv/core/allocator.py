"""An extent allocator over one arena: exact-fit fast path, first-fit fallback, coalescing frees.

Pure bookkeeping of offsets; it never touches memory. Every allocation is
aligned to ``alignment`` bytes (4096 by default, enough for O_DIRECT).

It keeps only the free extents: whoever allocates remembers the offset and the size
(L1 keeps both in its entries anyway), and hands both back to ``free``. A free that
overlaps free space (a double free, a wrong size) is refused.
"""

from __future__ import annotations

import bisect


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class ExtentAllocator:
    def __init__(self, capacity: int, alignment: int = 4096) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.capacity = capacity // alignment * alignment
        self.used = 0
        self._free_offsets: list[int] = []  # sorted
        self._free_size: dict[int, int] = {}
        self._by_size: dict[int, set[int]] = {}
        if self.capacity:
            self._add_free(0, self.capacity)

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    def largest_free(self) -> int:
        return max(self._free_size.values(), default=0)

    def rounded(self, nbytes: int) -> int:
        """The bytes an allocation of ``nbytes`` really takes."""
        return align_up(max(nbytes, 1), self.alignment)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new extent of at least ``nbytes``, or None if no free extent is large enough."""
        size = self.rounded(nbytes)
        exact = self._by_size.get(size)
        if exact:
            offset = min(exact)  # lowest address keeps the arena compact
            self._remove_free(offset)
        else:
            for offset in self._free_offsets:
                if self._free_size[offset] >= size:
                    break
            else:
                return None
            extent = self._free_size[offset]
            self._remove_free(offset)
            if extent > size:
                self._add_free(offset + size, extent - size)
        self.used += size
        return offset

    def free(self, offset: int, nbytes: int) -> int:
        """Return the extent ``allocate(nbytes)`` gave at ``offset``; coalesces with free
        neighbours. Returns the bytes freed. Raises ValueError, changing nothing, if the
        extent is outside the arena, misaligned, or overlaps free space."""
        size = self.rounded(nbytes)
        start, end = offset, offset + size
        if offset < 0 or offset % self.alignment or end > self.capacity:
            raise ValueError(f"extent [{start}, {end}) is not an allocation of this arena")
        index = bisect.bisect_left(self._free_offsets, offset)
        after_free = index < len(self._free_offsets) and self._free_offsets[index] < end
        before = self._free_offsets[index - 1] if index > 0 else None
        if after_free or (before is not None and before + self._free_size[before] > start):
            raise ValueError(f"extent [{start}, {end}) is not wholly allocated")
        self.used -= size
        if index < len(self._free_offsets) and self._free_offsets[index] == end:
            end += self._free_size[end]
            self._remove_free(self._free_offsets[index])
        if index > 0:
            prev = self._free_offsets[index - 1]
            if prev + self._free_size[prev] == start:
                start = prev
                self._remove_free(prev)
        self._add_free(start, end - start)
        return size

    def free_extents(self) -> list[tuple[int, int]]:
        return [(o, self._free_size[o]) for o in self._free_offsets]

    def _add_free(self, offset: int, size: int) -> None:
        bisect.insort(self._free_offsets, offset)
        self._free_size[offset] = size
        self._by_size.setdefault(size, set()).add(offset)

    def _remove_free(self, offset: int) -> None:
        index = bisect.bisect_left(self._free_offsets, offset)
        del self._free_offsets[index]
        size = self._free_size.pop(offset)
        bucket = self._by_size[size]
        bucket.discard(offset)
        if not bucket:
            del self._by_size[size]
