"""Copy plans: from a registration's tensor descriptions to the byte pieces of each block. Pure.

For every tensor, the elements of one block (the dims after ``block_dim``) must
form one dense byte range, in any stride order; the dims before ``block_dim``
repeat that range at fixed offsets ("pieces"). A block's bytes are therefore
``len(piece_offsets)`` pieces of ``piece_bytes`` each, at
``tensor.offset + piece_offset + block * block_stride``. Pieces that sit back to
back are coalesced into one (vLLM's cross-layer layout gives one piece per block).

A chunk in L1 is laid out segment by segment (one segment per tensor piece),
each segment holding that piece for every block of the chunk in order. The
layout's ``fingerprint`` names that arrangement: two registrations share chunks
only if their fingerprints are equal (equal bytes per block are not enough).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence

import msgspec

from ..errors import ErrorCode, TrioKVError
from ..protocol import TensorSpec

DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
}
MAX_TENSORS = 4096
MAX_PIECES_PER_BLOCK = 65536


class Segment(msgspec.Struct, frozen=True):
    """One piece of every block of one tensor: ``offset`` is absolute in the region, in bytes."""

    offset: int
    block_stride: int
    piece_bytes: int


class KVLayout(msgspec.Struct, frozen=True):
    segments: tuple[Segment, ...]
    num_blocks: int
    block_size: int  # tokens per block
    block_bytes: int  # bytes per block over every segment
    width: int  # widest element (1, 2, 4 or 8 bytes) that divides every offset and length
    fingerprint: str = ""  # of the chunk's byte arrangement (``layout_fingerprint``); "" unknown

    def chunk_bytes(self, blocks_per_chunk: int) -> int:
        return self.block_bytes * blocks_per_chunk


def _bad(message: str) -> TrioKVError:
    return TrioKVError(ErrorCode.BAD_REGISTRATION, message)


def _segments_of(index: int, spec: TensorSpec, region_bytes: int) -> tuple[int, list[Segment]]:
    """(num_blocks, segments) of one tensor, after validating it against the region."""
    name = f"tensor {index}"
    elem = DTYPE_BYTES.get(spec.dtype)
    if elem is None:
        raise _bad(f"{name}: unsupported dtype {spec.dtype!r}; known: {sorted(DTYPE_BYTES)}")
    ndim = len(spec.shape)
    if ndim == 0 or ndim != len(spec.strides):
        raise _bad(
            f"{name}: shape {spec.shape} and strides {spec.strides} must be non-empty and equal in length"
        )
    if not 0 <= spec.block_dim < ndim:
        raise _bad(f"{name}: block_dim {spec.block_dim} outside 0..{ndim - 1}")
    if any(s < 1 for s in spec.shape) or any(s < 0 for s in spec.strides):
        raise _bad(f"{name}: sizes must be >= 1 and strides >= 0")
    if spec.offset < 0 or spec.offset % elem:
        raise _bad(f"{name}: offset {spec.offset} must be >= 0 and a multiple of {elem}")
    extent = spec.offset + elem * (1 + sum((n - 1) * s for n, s in zip(spec.shape, spec.strides)))
    if extent > region_bytes:
        raise _bad(f"{name}: reaches byte {extent}, past the end of the {region_bytes}-byte region")

    inner = [
        (s, n) for n, s in zip(spec.shape[spec.block_dim + 1 :], spec.strides[spec.block_dim + 1 :]) if n > 1
    ]
    expected = 1
    for stride, size in sorted(inner):
        if stride != expected:
            raise _bad(f"{name}: the dims after block_dim must be dense (one byte range per block)")
        expected *= size
    piece_bytes = expected * elem
    block_stride = spec.strides[spec.block_dim] * elem
    num_blocks = spec.shape[spec.block_dim]
    if num_blocks > 1 and block_stride < piece_bytes:
        raise _bad(f"{name}: blocks overlap (block stride {block_stride} < {piece_bytes} bytes per block)")

    outer = list(zip(spec.shape[: spec.block_dim], spec.strides[: spec.block_dim]))
    if math.prod(n for n, _ in outer) > MAX_PIECES_PER_BLOCK:
        raise _bad(f"{name}: more than {MAX_PIECES_PER_BLOCK} pieces per block")
    offsets = [
        spec.offset + elem * sum(i * s for i, (_, s) in zip(idx, outer))
        for idx in itertools.product(*(range(n) for n, _ in outer))
    ]
    offsets.sort()
    if any(b - a < piece_bytes for a, b in itertools.pairwise(offsets)):
        raise _bad(f"{name}: the pieces of one block overlap (the dims before block_dim alias)")
    if all(b - a == piece_bytes for a, b in itertools.pairwise(offsets)):
        # Back-to-back pieces: one piece per block.
        merged = piece_bytes * len(offsets)
        if num_blocks > 1 and block_stride < merged:
            raise _bad(f"{name}: blocks overlap (block stride {block_stride} < {merged} bytes per block)")
        return num_blocks, [Segment(offsets[0], block_stride, merged)]
    return num_blocks, [Segment(o, block_stride, piece_bytes) for o in offsets]


def _arrangement(spec: TensorSpec) -> tuple[str, int, list[tuple[int, int]]]:
    """What fixes how a tensor's bytes sit in a chunk: its dtype, where its block dim is, and
    its other dims (index, size) from outermost to innermost in memory. Not the block count,
    offsets or stride values, which differ between registrations of the same layout."""
    dims = [(spec.strides[d], d, spec.shape[d]) for d in range(len(spec.shape)) if d != spec.block_dim]
    order = [(d, n) for _, d, n in sorted(dims, key=lambda dim: (-dim[0], dim[1])) if n > 1]
    return spec.dtype, spec.block_dim, order


def layout_fingerprint(tensors: Sequence[TensorSpec], block_size: int) -> str:
    """A short hash of the byte arrangement of a chunk: per-layer or cross-layer, the layer
    count, the K/V split, dtype and block shape (tensor by tensor, in order)."""
    described = [block_size, *(_arrangement(spec) for spec in tensors)]
    return hashlib.blake2b(msgspec.msgpack.encode(described), digest_size=8).hexdigest()


def plan_layout(tensors: Sequence[TensorSpec], block_size: int, region_bytes: int) -> KVLayout:
    """Validate a registration and derive its copy plan; raises BAD_REGISTRATION on any fault."""
    if not tensors:
        raise _bad("a registration needs at least one tensor")
    if len(tensors) > MAX_TENSORS:
        raise _bad(f"at most {MAX_TENSORS} tensors per registration")
    if block_size < 1:
        raise _bad(f"block_size must be >= 1, got {block_size}")
    segments: list[Segment] = []
    num_blocks: int | None = None
    for index, spec in enumerate(tensors):
        blocks, tensor_segments = _segments_of(index, spec, region_bytes)
        if num_blocks is None:
            num_blocks = blocks
        elif blocks != num_blocks:
            raise _bad(f"tensor {index} has {blocks} blocks, tensor 0 has {num_blocks}")
        segments.extend(tensor_segments)
    assert num_blocks is not None
    width = 8
    for seg in segments:
        while width > 1 and (seg.offset % width or seg.block_stride % width or seg.piece_bytes % width):
            width //= 2
    return KVLayout(
        segments=tuple(segments),
        num_blocks=num_blocks,
        block_size=block_size,
        block_bytes=sum(s.piece_bytes for s in segments),
        width=width,
        fingerprint=layout_fingerprint(tensors, block_size),
    )
