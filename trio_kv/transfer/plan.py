"""Copy plans for the CUDA path: a registration and some chunks -> arrays of (device, host, bytes). Pure.

``device_layout`` turns a CUDA registration into a ``KVLayout`` whose segment
offsets are absolute device addresses (each tensor is planned by
``layout.plan_layout`` against its own allocation, then shifted by that
allocation's base), so the rest of this module works on plain integers and
is tested without a GPU by treating addresses as offsets into numpy arrays.

``plan_copies`` lays a chunk out in L1 exactly as the CPU path does (segment by
segment, each segment holding that piece of every block of the chunk in order),
emits one piece per (segment, block) from ``first_block`` on, and coalesces
pieces that are back to back on both sides: vLLM's cross-layer layout gives one
piece per block, and runs of consecutive block ids merge further.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ErrorCode, TrioKVError
from ..protocol import CudaRegistration, TensorSpec
from .layout import MAX_TENSORS, KVLayout, Segment, layout_fingerprint, plan_layout

IPC_HANDLE_BYTES = 64  # CU_IPC_HANDLE_SIZE (cuda_driver checks the same)
DEVICE_UUID_BYTES = 16


def _bad(message: str) -> TrioKVError:
    return TrioKVError(ErrorCode.BAD_REGISTRATION, message)


def check_cuda_registration(tensors: Sequence[TensorSpec], cuda: CudaRegistration) -> None:
    """Validate the CUDA part of a registration before any handle is opened (BAD_REGISTRATION)."""
    if len(cuda.device_uuid) != DEVICE_UUID_BYTES:
        raise _bad(f"device_uuid must be {DEVICE_UUID_BYTES} bytes, got {len(cuda.device_uuid)}")
    if not cuda.allocations:
        raise _bad("a CUDA registration needs at least one allocation")
    if len(cuda.allocations) > MAX_TENSORS or len(tensors) > MAX_TENSORS:
        raise _bad(f"at most {MAX_TENSORS} tensors and allocations per registration")
    if len(cuda.tensor_allocations) != len(tensors):
        raise _bad(f"{len(tensors)} tensors but {len(cuda.tensor_allocations)} entries in tensor_allocations")
    for index, allocation in enumerate(cuda.allocations):
        if len(allocation.handle) != IPC_HANDLE_BYTES:
            raise _bad(f"allocation {index}: IPC handle must be {IPC_HANDLE_BYTES} bytes")
        if allocation.size < 1:
            raise _bad(f"allocation {index}: size must be >= 1, got {allocation.size}")
    for index, which in enumerate(cuda.tensor_allocations):
        if not 0 <= which < len(cuda.allocations):
            raise _bad(f"tensor {index}: allocation {which} outside 0..{len(cuda.allocations) - 1}")
    if cuda.event_handle and len(cuda.event_handle) != IPC_HANDLE_BYTES:
        raise _bad(f"event_handle must be empty or {IPC_HANDLE_BYTES} bytes")


def device_layout(
    tensors: Sequence[TensorSpec],
    block_size: int,
    tensor_bases: Sequence[int],
    tensor_regions: Sequence[int],
) -> KVLayout:
    """The copy plan of tensors that live in separate allocations.

    ``tensors[i]`` is checked against ``tensor_regions[i]`` bytes from ``tensor_bases[i]``
    (its allocation's base address); segment offsets in the result are absolute addresses.
    """
    if not tensors:
        raise _bad("a registration needs at least one tensor")
    segments: list[Segment] = []
    num_blocks: int | None = None
    width = 8
    for index, (spec, base, region) in enumerate(zip(tensors, tensor_bases, tensor_regions, strict=True)):
        try:
            own = plan_layout([spec], block_size, region)
        except TrioKVError as exc:
            raise _bad(exc.message.replace("tensor 0", f"tensor {index}", 1)) from None
        if num_blocks is None:
            num_blocks = own.num_blocks
        elif own.num_blocks != num_blocks:
            raise _bad(f"tensor {index} has {own.num_blocks} blocks, tensor 0 has {num_blocks}")
        width = min(width, own.width)
        while width > 1 and base % width:
            width //= 2
        segments.extend(Segment(base + s.offset, s.block_stride, s.piece_bytes) for s in own.segments)
    assert num_blocks is not None
    return KVLayout(
        segments=tuple(segments),
        num_blocks=num_blocks,
        block_size=block_size,
        block_bytes=sum(s.piece_bytes for s in segments),
        width=width,
        fingerprint=layout_fingerprint(tensors, block_size),
    )


@dataclass(frozen=True)
class ChunkCopy:
    """One chunk to move: ``block_ids[j]`` is the engine block of the chunk's j-th block;
    the chunk occupies ``nbytes`` at host ``address``; blocks before ``first_block`` are skipped."""

    block_ids: Sequence[int]
    address: int
    nbytes: int
    first_block: int = 0


@dataclass(frozen=True)
class CopyPlan:
    """Pieces to copy: ``device[i]`` <-> ``host[i]``, ``sizes[i]`` bytes each (uint64 arrays)."""

    device: np.ndarray
    host: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def total_bytes(self) -> int:
        return int(self.sizes.sum())


def _empty_plan() -> CopyPlan:
    empty = np.zeros(0, dtype=np.uint64)
    return CopyPlan(empty, empty, empty)


def plan_copies(layout: KVLayout, chunks: Sequence[ChunkCopy], *, coalesce: bool = True) -> CopyPlan:
    """Every piece that moves ``chunks`` between the engine's blocks and L1, coalesced.

    Raises INVALID_ARGUMENT / BLOCK_OUT_OF_RANGE for a chunk that does not fit its
    buffer or names a block outside the registration, so no address is ever
    computed outside a registered region or a chunk's buffer.
    """
    offsets = np.array([s.offset for s in layout.segments], dtype=np.int64)
    strides = np.array([s.block_stride for s in layout.segments], dtype=np.int64)
    pieces = np.array([s.piece_bytes for s in layout.segments], dtype=np.int64)
    device_parts: list[np.ndarray] = []
    host_parts: list[np.ndarray] = []
    size_parts: list[np.ndarray] = []
    for chunk in chunks:
        blocks = np.asarray(chunk.block_ids, dtype=np.int64)
        n_blocks = len(blocks)
        if not 0 <= chunk.first_block <= n_blocks:
            raise TrioKVError(
                ErrorCode.INVALID_ARGUMENT, f"first_block {chunk.first_block} outside 0..{n_blocks}"
            )
        if chunk.nbytes < n_blocks * layout.block_bytes:
            raise TrioKVError(
                ErrorCode.INVALID_ARGUMENT,
                f"a chunk of {n_blocks} blocks needs {n_blocks * layout.block_bytes} bytes, "
                f"its buffer holds {chunk.nbytes}",
            )
        moved = blocks[chunk.first_block :]
        if moved.size == 0:
            continue
        if moved.min() < 0 or moved.max() >= layout.num_blocks:
            bad = int(moved[(moved < 0) | (moved >= layout.num_blocks)][0])
            raise TrioKVError(
                ErrorCode.BLOCK_OUT_OF_RANGE, f"block id {bad} outside 0..{layout.num_blocks - 1}"
            )
        # Segment s of the chunk starts after every earlier segment's n_blocks pieces.
        segment_starts = chunk.address + np.concatenate(([0], np.cumsum(pieces[:-1] * n_blocks)))
        positions = np.arange(chunk.first_block, n_blocks, dtype=np.int64)
        device_parts.append((offsets[:, None] + moved[None, :] * strides[:, None]).ravel())
        host_parts.append((segment_starts[:, None] + positions[None, :] * pieces[:, None]).ravel())
        size_parts.append(np.repeat(pieces, len(moved)))
    if not size_parts:
        return _empty_plan()
    device = np.concatenate(device_parts)
    host = np.concatenate(host_parts)
    sizes = np.concatenate(size_parts)
    if coalesce:
        device, host, sizes = _coalesce(device, host, sizes)
    return CopyPlan(device.astype(np.uint64), host.astype(np.uint64), sizes.astype(np.uint64))


def _coalesce(device: np.ndarray, host: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Merge each piece into the one before it when both sides continue where it ended."""
    follows = (device[1:] == device[:-1] + sizes[:-1]) & (host[1:] == host[:-1] + sizes[:-1])
    starts = np.flatnonzero(np.concatenate(([True], ~follows)))
    return device[starts], host[starts], np.add.reduceat(sizes, starts)
