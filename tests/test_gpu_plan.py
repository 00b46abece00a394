"""CUDA copy plans without a GPU: addresses are offsets into numpy arrays, so a plan can be
executed on the CPU and compared byte for byte with what the CPU path copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trio_kv.errors import ErrorCode, TrioKVError
from trio_kv.export.shm import SharedKVCache
from trio_kv.protocol import CudaAllocation, CudaRegistration, TensorSpec
from trio_kv.testing import make_kv_cache
from trio_kv.transfer.cpu import CopyJob, CpuTransfer
from trio_kv.transfer.layout import KVLayout
from trio_kv.transfer.plan import (
    IPC_HANDLE_BYTES,
    ChunkCopy,
    CopyPlan,
    check_cuda_registration,
    device_layout,
    plan_copies,
)

NB, BS, LAYERS, HEADS, HEAD = 24, 4, 3, 2, 8
BLOCKS_PER_CHUNK = 4
SCATTERED = [[20, 3, 11, 0], [7, 15, 9, 1]]  # no two neighbours in a row: nothing coalesces
CONSECUTIVE = [[4, 5, 6, 7], [12, 13, 14, 15]]


@pytest.fixture(params=["per_layer", "cross_layer"])
def kv(request):
    with make_kv_cache(
        num_blocks=NB,
        block_size=BS,
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_size=HEAD,
        layout=request.param,
    ) as cache:
        yield cache


def region_layout(kv: SharedKVCache) -> KVLayout:
    """The layout as the CUDA path derives it, with the shared-memory region as "device memory"
    at address 0 (every tensor's allocation is the whole region)."""
    return device_layout(kv.specs, BS, [0] * len(kv.specs), [kv.nbytes] * len(kv.specs))


def chunks_for(layout: KVLayout, block_ids: list[list[int]], first_block: int = 0) -> list[ChunkCopy]:
    """Chunks laid out back to back in an L1 array starting at address 0."""
    size = layout.chunk_bytes(BLOCKS_PER_CHUNK)
    return [ChunkCopy(ids, i * size, size, first_block) for i, ids in enumerate(block_ids)]


def run_plan(plan: CopyPlan, device: np.ndarray, host: np.ndarray, *, to_host: bool) -> None:
    """Execute a plan on the CPU, addresses being offsets into the two arrays."""
    for d, h, n in zip(plan.device.tolist(), plan.host.tolist(), plan.sizes.tolist()):
        if to_host:
            host[h : h + n] = device[d : d + n]
        else:
            device[d : d + n] = host[h : h + n]


def region_bytes(kv: SharedKVCache) -> np.ndarray:
    return kv.region.numpy()


def cpu_jobs(arena: torch.Tensor, layout: KVLayout, block_ids: list[list[int]], first_block: int = 0):
    size = layout.chunk_bytes(BLOCKS_PER_CHUNK)
    return [CopyJob(ids, arena[i * size : (i + 1) * size], first_block) for i, ids in enumerate(block_ids)]


# ---------------------------------------------------------------- piece counts


def test_per_layer_gives_two_pieces_per_block_per_layer_and_cross_layer_one():
    with make_kv_cache(num_blocks=NB, block_size=BS, num_layers=LAYERS, layout="per_layer") as per_layer:
        layout = region_layout(per_layer)
        plan = plan_copies(layout, chunks_for(layout, SCATTERED[:1]))
        assert len(plan) == 2 * LAYERS * BLOCKS_PER_CHUNK
    with make_kv_cache(num_blocks=NB, block_size=BS, num_layers=LAYERS, layout="cross_layer") as cross:
        layout = region_layout(cross)
        plan = plan_copies(layout, chunks_for(layout, SCATTERED[:1]))
        assert len(plan) == BLOCKS_PER_CHUNK
        assert set(plan.sizes.tolist()) == {layout.block_bytes}


def test_plan_arrays_are_contiguous_uint64_as_the_batch_call_reads_them(kv):
    layout = region_layout(kv)
    plan = plan_copies(layout, chunks_for(layout, SCATTERED))
    for array in (plan.device, plan.host, plan.sizes):
        assert array.dtype == np.uint64 and array.flags.c_contiguous


def test_consecutive_blocks_coalesce_into_one_piece_per_segment(kv):
    layout = region_layout(kv)
    plan = plan_copies(layout, chunks_for(layout, CONSECUTIVE[:1]))
    assert len(plan) == len(layout.segments)
    assert plan.total_bytes == layout.chunk_bytes(BLOCKS_PER_CHUNK)


def test_coalescing_keeps_every_byte(kv):
    layout = region_layout(kv)
    chunks = chunks_for(layout, [[2, 3, 9, 10], [0, 1, 2, 3]])
    merged, pieces = plan_copies(layout, chunks), plan_copies(layout, chunks, coalesce=False)
    assert len(merged) < len(pieces)
    assert merged.total_bytes == pieces.total_bytes == 2 * layout.chunk_bytes(BLOCKS_PER_CHUNK)
    source = region_bytes(kv)
    one, other = np.zeros(merged.total_bytes, np.uint8), np.ones(merged.total_bytes, np.uint8)
    run_plan(merged, source, one, to_host=True)
    run_plan(pieces, source, other, to_host=True)
    assert np.array_equal(one, other)


def test_pieces_never_merge_across_a_gap_on_either_side(kv):
    layout = region_layout(kv)
    plan = plan_copies(layout, chunks_for(layout, SCATTERED))
    ends_d = plan.device[:-1] + plan.sizes[:-1]
    ends_h = plan.host[:-1] + plan.sizes[:-1]
    assert not np.any((ends_d == plan.device[1:]) & (ends_h == plan.host[1:]))


# ---------------------------------------------------------------- same bytes as the CPU path


@pytest.mark.parametrize("block_ids", [SCATTERED, CONSECUTIVE], ids=["scattered", "consecutive"])
def test_store_plan_lays_chunks_out_in_l1_exactly_like_the_cpu_path(kv, block_ids):
    layout = region_layout(kv)
    cache = CpuTransfer().open(kv.register_request("plan"))
    expected = torch.zeros(2 * layout.chunk_bytes(BLOCKS_PER_CHUNK), dtype=torch.uint8)
    cache.gather(cpu_jobs(expected, layout, block_ids))

    planned = np.zeros(expected.numel(), np.uint8)
    run_plan(plan_copies(layout, chunks_for(layout, block_ids)), region_bytes(kv), planned, to_host=True)
    assert np.array_equal(planned, expected.numpy())


@pytest.mark.parametrize("first_block", [0, 1, 3])
def test_retrieve_plan_writes_the_blocks_the_cpu_path_writes(kv, first_block):
    layout = region_layout(kv)
    chunk_l1 = (np.arange(2 * layout.chunk_bytes(BLOCKS_PER_CHUNK)) % 251).astype(np.uint8)
    expected = region_bytes(kv).copy()
    planned = region_bytes(kv).copy()

    cache = CpuTransfer().open(kv.register_request("plan"))
    cache.scatter(cpu_jobs(torch.from_numpy(chunk_l1.copy()), layout, SCATTERED, first_block))
    expected[:] = region_bytes(kv)
    run_plan(
        plan_copies(layout, chunks_for(layout, SCATTERED, first_block)), planned, chunk_l1, to_host=False
    )
    assert np.array_equal(planned, expected)


# ---------------------------------------------------------------- skip_first_n (first_block)


def test_first_block_skips_the_leading_blocks_of_each_chunk(kv):
    layout = region_layout(kv)
    plan = plan_copies(layout, chunks_for(layout, SCATTERED, first_block=1), coalesce=False)
    assert plan.total_bytes == 2 * (BLOCKS_PER_CHUNK - 1) * layout.block_bytes
    skipped = {20, 7}
    touched = set()
    for seg in layout.segments:
        for block in range(NB):
            start = seg.offset + block * seg.block_stride
            if np.any((plan.device >= start) & (plan.device < start + seg.piece_bytes)):
                touched.add(block)
    assert touched.isdisjoint(skipped)
    assert touched == {b for ids in SCATTERED for b in ids} - skipped


def test_first_block_keeps_the_l1_position_of_the_blocks_it_moves(kv):
    layout = region_layout(kv)
    whole = plan_copies(layout, chunks_for(layout, SCATTERED), coalesce=False)
    tail = plan_copies(layout, chunks_for(layout, SCATTERED, first_block=2), coalesce=False)
    pairs = set(zip(whole.device.tolist(), whole.host.tolist()))
    assert set(zip(tail.device.tolist(), tail.host.tolist())) <= pairs


def test_first_block_at_the_end_of_every_chunk_plans_nothing(kv):
    layout = region_layout(kv)
    assert len(plan_copies(layout, chunks_for(layout, SCATTERED, first_block=BLOCKS_PER_CHUNK))) == 0
    assert len(plan_copies(layout, [])) == 0


# ---------------------------------------------------------------- bounds


def plan_error(layout: KVLayout, chunks: list[ChunkCopy]) -> TrioKVError:
    with pytest.raises(TrioKVError) as caught:
        plan_copies(layout, chunks)
    return caught.value


@pytest.mark.parametrize("bad", [-1, NB, NB + 100])
def test_block_id_outside_the_registration_is_refused(kv, bad):
    layout = region_layout(kv)
    error = plan_error(layout, chunks_for(layout, [[0, 1, bad, 2]]))
    assert error.code is ErrorCode.BLOCK_OUT_OF_RANGE
    assert str(bad) in error.message


def test_skipped_blocks_are_not_bounds_checked_because_nothing_touches_them(kv):
    layout = region_layout(kv)
    plan = plan_copies(layout, chunks_for(layout, [[NB + 5, 1, 2, 3]], first_block=1))
    assert plan.total_bytes == 3 * layout.block_bytes


def test_buffer_too_small_for_its_chunk_is_refused(kv):
    layout = region_layout(kv)
    short = ChunkCopy([0, 1, 2, 3], 0, layout.chunk_bytes(BLOCKS_PER_CHUNK) - 1)
    assert plan_error(layout, [short]).code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("first_block", [-1, BLOCKS_PER_CHUNK + 1])
def test_first_block_outside_the_chunk_is_refused(kv, first_block):
    layout = region_layout(kv)
    chunk = ChunkCopy([0, 1, 2, 3], 0, layout.chunk_bytes(BLOCKS_PER_CHUNK), first_block)
    assert plan_error(layout, [chunk]).code is ErrorCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- device layouts


def per_layer_spec(offset: int = 0) -> TensorSpec:
    shape = [2, NB, BS, HEADS, HEAD]
    strides = [NB * BS * HEADS * HEAD, BS * HEADS * HEAD, HEADS * HEAD, HEAD, 1]
    return TensorSpec(offset, "bfloat16", shape, strides, 1)


TENSOR_BYTES = 2 * NB * BS * HEADS * HEAD * 2


def test_each_tensor_is_placed_at_its_own_allocation_base():
    bases = [1 << 40, 3 << 40]
    layout = device_layout([per_layer_spec(), per_layer_spec(512)], BS, bases, [TENSOR_BYTES, 1 << 20])
    assert [s.offset for s in layout.segments] == [
        bases[0],
        bases[0] + TENSOR_BYTES // 2,
        bases[1] + 512,
        bases[1] + 512 + TENSOR_BYTES // 2,
    ]
    assert layout.num_blocks == NB


def test_tensor_reaching_past_its_allocation_is_refused_by_index():
    with pytest.raises(TrioKVError) as caught:
        device_layout([per_layer_spec(), per_layer_spec(64)], BS, [0, 1 << 30], [TENSOR_BYTES, TENSOR_BYTES])
    assert caught.value.code is ErrorCode.BAD_REGISTRATION
    assert "tensor 1" in caught.value.message


def test_tensors_with_different_block_counts_are_refused():
    other = TensorSpec(0, "bfloat16", [NB + 1, 64], [64, 1], 0)
    with pytest.raises(TrioKVError) as caught:
        device_layout([per_layer_spec(), other], BS, [0, 0], [1 << 30, 1 << 30])
    assert caught.value.code is ErrorCode.BAD_REGISTRATION


def test_an_oddly_aligned_base_narrows_the_element_width():
    layout = device_layout([per_layer_spec()], BS, [(1 << 40) + 2], [TENSOR_BYTES])
    assert layout.width == 2


# ---------------------------------------------------------------- registration checks


def registration(**changes) -> CudaRegistration:
    fields = {
        "device_uuid": bytes(16),
        "allocations": [CudaAllocation(bytes(IPC_HANDLE_BYTES), TENSOR_BYTES)],
        "tensor_allocations": [0],
        "event_handle": b"",
    }
    fields.update(changes)
    return CudaRegistration(**fields)


def test_well_formed_registration_passes():
    check_cuda_registration([per_layer_spec()], registration())
    check_cuda_registration([per_layer_spec()], registration(event_handle=bytes(IPC_HANDLE_BYTES)))


@pytest.mark.parametrize(
    "changes",
    [
        {"device_uuid": bytes(15)},
        {"allocations": []},
        {"allocations": [CudaAllocation(bytes(63), TENSOR_BYTES)]},
        {"allocations": [CudaAllocation(bytes(IPC_HANDLE_BYTES), 0)]},
        {"tensor_allocations": []},
        {"tensor_allocations": [1]},
        {"tensor_allocations": [-1]},
        {"event_handle": b"short"},
    ],
    ids=[
        "uuid-length",
        "no-allocation",
        "handle-length",
        "empty-allocation",
        "tensor-count",
        "allocation-index",
        "negative-index",
        "event-length",
    ],
)
def test_malformed_registration_is_bad_registration(changes):
    with pytest.raises(TrioKVError) as caught:
        check_cuda_registration([per_layer_spec()], registration(**changes))
    assert caught.value.code is ErrorCode.BAD_REGISTRATION
