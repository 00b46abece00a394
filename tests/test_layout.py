"""Copy plans: tensor descriptions -> per-block byte segments, checked against real torch
tensors, and every malformed registration -> BAD_REGISTRATION."""

import pytest
import torch

from trio_kv.errors import ErrorCode, TrioKVError
from trio_kv.protocol import TensorSpec
from trio_kv.transfer.layout import DTYPE_BYTES, KVLayout, plan_layout

NB, BS, H, D, LAYERS = 6, 4, 2, 8, 3  # blocks, tokens per block, kv heads, head size, layers
BIG = 1 << 30


def spec(tensor: torch.Tensor, block_dim: int, offset: int = 0) -> TensorSpec:
    """Describe a real tensor the way an engine registers it."""
    return TensorSpec(
        offset=offset,
        dtype=str(tensor.dtype).removeprefix("torch."),
        shape=list(tensor.shape),
        strides=list(tensor.stride()),
        block_dim=block_dim,
    )


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def block_bytes_of(tensors: list[tuple[torch.Tensor, int]]) -> int:
    """Bytes of one block, computed from torch alone."""
    return sum(t.select(dim, 0).numel() * t.element_size() for t, dim in tensors)


def byte_addresses(tensor: torch.Tensor, offset: int) -> torch.Tensor:
    """The region byte address of every byte of every element of ``tensor``, in its logical shape
    (plus one trailing dim for the bytes of an element)."""
    elem = tensor.element_size()
    element_index = torch.arange(nbytes(tensor) // elem, dtype=torch.int64)
    element_index = element_index.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
    return offset + element_index.unsqueeze(-1) * elem + torch.arange(elem)


def block_address_set(tensors: list[tuple[torch.Tensor, int, int]], block: int) -> set[int]:
    """Every byte address that belongs to ``block``, from torch's own indexing."""
    out: set[int] = set()
    for tensor, block_dim, offset in tensors:
        out.update(byte_addresses(tensor, offset).select(block_dim, block).flatten().tolist())
    return out


def planned_address_set(layout: KVLayout, block: int) -> set[int]:
    out: set[int] = set()
    for seg in layout.segments:
        start = seg.offset + block * seg.block_stride
        out.update(range(start, start + seg.piece_bytes))
    return out


def planned_bytes_are_disjoint(layout: KVLayout, block: int) -> bool:
    return sum(s.piece_bytes for s in layout.segments) == len(planned_address_set(layout, block))


def rejected(tensors: list[TensorSpec], region_bytes: int = BIG, block_size: int = BS) -> TrioKVError:
    with pytest.raises(TrioKVError) as caught:
        plan_layout(tensors, block_size, region_bytes)
    assert caught.value.code is ErrorCode.BAD_REGISTRATION
    return caught.value


def per_layer_tensors(dtype=torch.float16) -> list[tuple[torch.Tensor, int, int]]:
    """vLLM's per-layer layout: one (2, num_blocks, block_size, heads, head_size) tensor per
    layer, placed back to back in one region."""
    out, offset = [], 0
    for _ in range(LAYERS):
        tensor = torch.empty(2, NB, BS, H, D, dtype=dtype)
        out.append((tensor, 1, offset))
        offset += nbytes(tensor)
    return out


def cross_layer_tensor(dtype=torch.bfloat16) -> torch.Tensor:
    """vLLM's cross-layer layout: (num_blocks, layers, 2, block_size, heads, head_size)."""
    return torch.empty(NB, LAYERS, 2, BS, H, D, dtype=dtype)


# ---------------------------------------------------------------- accepted layouts


def test_per_layer_layout_gives_two_segments_per_tensor():
    tensors = per_layer_tensors()
    layout = plan_layout([spec(t, d, o) for t, d, o in tensors], BS, BIG)
    assert len(layout.segments) == 2 * LAYERS
    assert layout.num_blocks == NB
    assert layout.block_size == BS


def test_per_layer_segments_cover_exactly_each_blocks_bytes():
    tensors = per_layer_tensors()
    layout = plan_layout([spec(t, d, o) for t, d, o in tensors], BS, BIG)
    for block in range(NB):
        assert planned_address_set(layout, block) == block_address_set(tensors, block)
        assert planned_bytes_are_disjoint(layout, block)


def test_cross_layer_layout_gives_one_segment_per_block():
    tensor = cross_layer_tensor()
    layout = plan_layout([spec(tensor, 0)], BS, nbytes(tensor))
    assert len(layout.segments) == 1
    assert layout.segments[0].piece_bytes == layout.segments[0].block_stride == layout.block_bytes


def test_cross_layer_segment_covers_exactly_each_blocks_bytes():
    tensor = cross_layer_tensor()
    layout = plan_layout([spec(tensor, 0, offset=4096)], BS, 4096 + nbytes(tensor))
    for block in range(NB):
        assert planned_address_set(layout, block) == block_address_set([(tensor, 0, 4096)], block)


def test_permuted_dense_inner_layout_is_accepted():
    # Physically HND (2, nb, heads, block_size, head_size), logically NHD.
    logical = torch.empty(2, NB, BS, H, D, dtype=torch.float16)
    hnd = logical.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    assert not hnd.is_contiguous()
    layout = plan_layout([spec(hnd, 1)], BS, nbytes(hnd))
    assert len(layout.segments) == 2
    for block in range(NB):
        assert planned_address_set(layout, block) == block_address_set([(hnd, 1, 0)], block)


def test_back_to_back_pieces_are_coalesced_into_one_segment():
    # K and V of a block are adjacent in memory, though the K/V dim comes before block_dim.
    kv_per_block = torch.empty(NB, 2, BS, H, D, dtype=torch.float16).transpose(0, 1)
    layout = plan_layout([spec(kv_per_block, 1)], BS, nbytes(kv_per_block))
    assert len(layout.segments) == 1
    for block in range(NB):
        assert planned_address_set(layout, block) == block_address_set([(kv_per_block, 1, 0)], block)


def test_many_outer_dims_give_one_segment_per_piece():
    # (layers, 2, nb, ...) in one tensor with block_dim=2: 2*LAYERS pieces per block.
    tensor = torch.empty(LAYERS, 2, NB, BS, H, D, dtype=torch.float32)
    layout = plan_layout([spec(tensor, 2)], BS, nbytes(tensor))
    assert len(layout.segments) == 2 * LAYERS
    for block in range(NB):
        assert planned_address_set(layout, block) == block_address_set([(tensor, 2, 0)], block)


def test_size_one_inner_dims_with_any_stride_are_dense():
    tensor = torch.empty(NB, BS, 1, D, dtype=torch.float16)
    strided = tensor.as_strided(tensor.shape, (BS * D, D, 12345, 1))
    layout = plan_layout([spec(strided, 0)], BS, nbytes(tensor))
    assert layout.block_bytes == BS * D * 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: [(t, d) for t, d, _ in per_layer_tensors()],
        lambda: [(cross_layer_tensor(), 0)],
        lambda: [
            (torch.empty(2, NB, BS, H, D, dtype=torch.float8_e4m3fn), 1),
            (torch.empty(NB, 16, dtype=torch.int64), 0),
        ],
        lambda: [(torch.empty(LAYERS, 2, NB, BS, H, D, dtype=torch.float32), 2)],
    ],
    ids=["per-layer", "cross-layer", "mixed-dtypes", "layer-major"],
)
def test_block_bytes_equals_one_block_of_every_tensor(make):
    tensors = make()
    specs, offset = [], 0
    for tensor, block_dim in tensors:
        specs.append(spec(tensor, block_dim, offset))
        offset += nbytes(tensor)
    layout = plan_layout(specs, BS, offset)
    assert layout.block_bytes == block_bytes_of(tensors)
    assert layout.chunk_bytes(4) == 4 * block_bytes_of(tensors)


def test_tensor_exactly_filling_the_region_is_accepted():
    tensor = torch.empty(NB, BS, H, D, dtype=torch.float16)
    plan_layout([spec(tensor, 0, offset=64)], BS, 64 + nbytes(tensor))


# ---------------------------------------------------------------- width


def test_width_is_8_when_everything_is_8_aligned():
    layout = plan_layout([spec(torch.empty(NB, BS, H, D, dtype=torch.float16), 0, offset=64)], BS, BIG)
    assert layout.width == 8


def test_width_is_4_for_a_4_aligned_offset():
    layout = plan_layout([spec(torch.empty(NB, BS, H, D, dtype=torch.float16), 0, offset=4)], BS, BIG)
    assert layout.width == 4


def test_width_is_2_for_2_byte_pieces():
    layout = plan_layout([spec(torch.empty(NB, 1, dtype=torch.float16), 0)], BS, BIG)
    assert layout.width == 2


def test_width_is_1_for_an_odd_block_stride():
    layout = plan_layout([spec(torch.empty(NB, 3, dtype=torch.uint8), 0)], BS, BIG)
    assert layout.width == 1


def test_width_is_the_narrowest_over_all_tensors():
    wide = torch.empty(NB, BS, H, D, dtype=torch.float32)
    narrow = torch.empty(NB, 1, dtype=torch.float16)
    layout = plan_layout([spec(wide, 0), spec(narrow, 0, offset=nbytes(wide))], BS, BIG)
    assert layout.width == 2


# ---------------------------------------------------------------- rejected layouts


def test_non_dense_inner_dims_are_rejected():
    padded = torch.empty(NB, BS, H, 2 * D, dtype=torch.float16)[..., :D]
    rejected([spec(padded, 0)])


def test_inner_dims_with_a_gap_between_them_are_rejected():
    tensor = torch.empty(2, NB, BS, H, D + 1, dtype=torch.float16)[..., :D]
    rejected([spec(tensor, 1)])


def test_repeated_inner_elements_are_rejected():
    expanded = torch.empty(NB, 1, D, dtype=torch.float16).expand(NB, BS, D)
    rejected([spec(expanded, 0)])


def test_extent_past_the_region_is_rejected():
    tensor = torch.empty(NB, BS, H, D, dtype=torch.float16)
    error = rejected([spec(tensor, 0, offset=2)], region_bytes=nbytes(tensor))
    assert "past the end" in error.message


def test_unknown_dtype_is_rejected():
    tensor = spec(torch.empty(NB, BS), 0)
    error = rejected([TensorSpec(tensor.offset, "complex64", tensor.shape, tensor.strides, 0)])
    assert "complex64" in error.message


def test_mismatched_num_blocks_across_tensors_is_rejected():
    first = torch.empty(NB, BS, dtype=torch.float16)
    second = torch.empty(NB + 1, BS, dtype=torch.float16)
    rejected([spec(first, 0), spec(second, 0, offset=nbytes(first))])


def test_negative_stride_is_rejected():
    rejected([TensorSpec(offset=4096, dtype="float16", shape=[NB, BS], strides=[-BS, 1], block_dim=0)])


def test_negative_inner_stride_is_rejected():
    rejected([TensorSpec(offset=4096, dtype="float16", shape=[NB, BS], strides=[BS, -1], block_dim=0)])


@pytest.mark.parametrize("offset", [1, 3, -4])
def test_misaligned_or_negative_offset_is_rejected(offset):
    rejected([spec(torch.empty(NB, BS, dtype=torch.float32), 0, offset=offset)])


@pytest.mark.parametrize("block_dim", [-1, 2, 5])
def test_block_dim_out_of_range_is_rejected(block_dim):
    rejected([spec(torch.empty(NB, BS, dtype=torch.float16), block_dim)])


def test_shape_and_strides_of_different_lengths_are_rejected():
    rejected([TensorSpec(offset=0, dtype="float16", shape=[NB, BS], strides=[BS], block_dim=0)])


def test_zero_dimensional_tensor_is_rejected():
    rejected([TensorSpec(offset=0, dtype="float16", shape=[], strides=[], block_dim=0)])


def test_zero_sized_dim_is_rejected():
    rejected([TensorSpec(offset=0, dtype="float16", shape=[NB, 0], strides=[1, 1], block_dim=0)])


def test_no_tensors_is_rejected():
    rejected([])


def test_block_size_below_one_is_rejected():
    rejected([spec(torch.empty(NB, BS), 0)], block_size=0)


def test_overlapping_blocks_are_rejected():
    tensor = torch.empty((NB + 1) * BS, dtype=torch.float16).as_strided((NB, 2 * BS), (BS, 1))
    rejected([spec(tensor, 0)])


def test_blocks_overlapping_through_coalesced_pieces_are_rejected():
    # K of block b+1 is V of block b: the pieces coalesce, and the block stride is too short.
    storage = torch.empty((NB + 1) * BS * D, dtype=torch.float16)
    aliased = storage.as_strided((2, NB, BS * D), (BS * D, BS * D, 1))
    rejected([spec(aliased, 1)])


def test_pieces_aliasing_inside_a_block_are_rejected():
    # An expanded K/V dim: K and V are the same memory, so a block is not 2 distinct pieces.
    expanded = torch.empty(1, NB, BS, D, dtype=torch.float16).expand(2, NB, BS, D)
    rejected([spec(expanded, 1)])


def test_known_dtypes_match_torch_element_sizes():
    for name, size in DTYPE_BYTES.items():
        assert getattr(torch, name).itemsize == size, name
