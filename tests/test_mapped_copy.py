"""Gathers and scatters of a mapped KV cache move exactly the bytes a byte-by-byte reference
moves, whichever copy path (runs of consecutive blocks as slices, the rest by index) each
row takes, however the rows are split into parts."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trio_kv.testing import make_kv_cache
from trio_kv.transfer import CpuTransfer, mapped
from trio_kv.transfer.layout import KVLayout, Segment
from trio_kv.transfer.mapped import MIN_RUN_BYTES, CopyJob, MappedKVCache, copy_steps, group_segments

NUM_BLOCKS = 48
BLOCKS_PER_CHUNK = 8


def _strided_layout() -> KVLayout:
    """Three segments of different piece sizes, blocks strided wider than their pieces (gaps)."""
    segments = (
        Segment(offset=64, block_stride=96, piece_bytes=32),
        Segment(offset=64 + 32, block_stride=96, piece_bytes=48),
        Segment(offset=64 + 96 * NUM_BLOCKS, block_stride=16, piece_bytes=16),
    )
    return KVLayout(segments, NUM_BLOCKS, block_size=4, block_bytes=96, width=8)


def _reference_gather(region: bytes, layout: KVLayout, block_ids: list[int]) -> bytes:
    """A chunk's bytes, segment by segment, each holding its piece of every block in order."""
    return b"".join(
        region[seg.offset + block * seg.block_stride :][: seg.piece_bytes]
        for seg in layout.segments
        for block in block_ids
    )


def _reference_scatter(region: bytearray, layout: KVLayout, job: CopyJob) -> None:
    chunk, cursor = job.buffer.numpy().tobytes(), 0
    for seg in layout.segments:
        for position, block in enumerate(job.block_ids):
            if position >= job.first_block:
                at = seg.offset + block * seg.block_stride
                region[at : at + seg.piece_bytes] = chunk[cursor : cursor + seg.piece_bytes]
            cursor += seg.piece_bytes


def _block_ids(rng: random.Random, kind: str, pool: list[int]) -> list[int]:
    """Take BLOCKS_PER_CHUNK distinct blocks from ``pool``: one run, scattered, or runs and
    single blocks mixed."""
    if kind == "run":
        start = rng.choice([i for i in range(len(pool) - BLOCKS_PER_CHUNK + 1)])
        ids = pool[start : start + BLOCKS_PER_CHUNK]
    elif kind == "scattered":
        ids = rng.sample(pool, BLOCKS_PER_CHUNK)
    else:
        start = rng.randrange(len(pool) - 3)
        ids = pool[start : start + 3]  # a run of 3, then 5 more blocks wherever they fall
        ids += rng.sample([b for b in pool if b not in ids], BLOCKS_PER_CHUNK - 3)
    for block in ids:
        pool.remove(block)
    return ids


def _caches() -> dict[str, tuple[MappedKVCache, torch.Tensor]]:
    """Mapped caches over plain tensors (no file): the strided layout and vLLM-shaped ones."""
    strided = _strided_layout()
    region = torch.zeros(64 + 96 * NUM_BLOCKS + 16 * NUM_BLOCKS + 8, dtype=torch.uint8)
    caches = {"strided": (MappedKVCache(strided, region), region)}
    transfer = CpuTransfer()
    for layout in ("per_layer", "cross_layer"):
        with make_kv_cache(num_blocks=NUM_BLOCKS, num_layers=2, layout=layout) as kv:
            opened = transfer.open(kv.register_request(layout))
            transfer.discard(opened)
            region = torch.zeros(kv.nbytes, dtype=torch.uint8)
        caches[layout] = (MappedKVCache(opened.layout, region), region)
    return caches


@pytest.fixture(scope="module")
def caches() -> dict[str, tuple[MappedKVCache, torch.Tensor]]:
    return _caches()


@pytest.mark.parametrize("layout", ["strided", "per_layer", "cross_layer"])
@pytest.mark.parametrize("min_run_bytes", [0, MIN_RUN_BYTES, 1 << 40], ids=["slices", "default", "take"])
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("seed", range(3))
def test_gather_then_scatter_moves_the_reference_bytes(
    caches, layout, min_run_bytes, parts, split, seed, monkeypatch
):
    # Parts split each (job, segment) unit by rows, or take whole units in turn.
    monkeypatch.setattr(mapped, "WHOLE_UNITS_PER_PART", 1 if split == "units" else 1 << 40)
    rng = random.Random(f"{layout}-{min_run_bytes}-{parts}-{seed}")
    cache, region = caches[layout]
    cache.min_run_bytes = min_run_bytes
    region.copy_(torch.randint(0, 256, region.shape, dtype=torch.uint8))
    chunk_bytes = cache.layout.chunk_bytes(BLOCKS_PER_CHUNK)

    pool = list(range(NUM_BLOCKS))
    kinds = ["run", "scattered", "mixed", "run", "mixed"]
    sources = [_block_ids(rng, kind, pool) for kind in kinds]
    stored = [CopyJob(ids, torch.zeros(chunk_bytes, dtype=torch.uint8)) for ids in sources]
    for part in range(parts):
        cache.gather(stored, part, parts)
    before = bytes(region.numpy())
    for job in stored:
        assert job.buffer.numpy().tobytes() == _reference_gather(before, cache.layout, job.block_ids)

    # Back into other blocks, some jobs from a first_block > 0 on.
    pool = list(range(NUM_BLOCKS))
    targets = [_block_ids(rng, kind, pool) for kind in reversed(kinds)]
    written = [
        CopyJob(ids, job.buffer, first_block=rng.choice([0, 0, 3, BLOCKS_PER_CHUNK - 1]))
        for ids, job in zip(targets, stored, strict=True)
    ]
    expected = bytearray(before)
    for job in written:
        _reference_scatter(expected, cache.layout, job)
    for part in range(parts):
        cache.scatter(written, part, parts)
    assert bytes(region.numpy()) == bytes(expected)
    assert bytes(expected) != before


def test_copy_steps_slice_long_runs_and_index_the_rows_between_them():
    index = np.array([4, 5, 6, 9, 20, 21, 22, 23, 1], dtype=np.int64)
    assert copy_steps(index, slice(0, 9), min_rows=3) == [(0, 3, 4), (3, 4, None), (4, 8, 20), (8, 9, None)]
    assert copy_steps(index, slice(0, 9), min_rows=1) == [
        (0, 3, 4), (3, 4, 9), (4, 8, 20), (8, 9, 1),
    ]  # fmt: skip
    assert copy_steps(index, slice(0, 9), min_rows=10) == [(0, 9, None)]


def test_copy_steps_of_a_share_start_and_stop_inside_runs():
    index = np.arange(10, 30, dtype=np.int64)
    assert copy_steps(index, slice(7, 13), min_rows=2) == [(7, 13, 17)]
    assert copy_steps(index, slice(7, 7), min_rows=2) == []
    assert copy_steps(index, slice(7, 7), min_rows=100) == []


def test_segments_alike_at_even_steps_group_into_one_view():
    seg = Segment  # offset, block stride, piece bytes
    assert group_segments([seg(0, 64, 64), seg(1000, 64, 64), seg(2000, 64, 64), seg(3000, 64, 64)]) == [
        (0, 4)
    ]
    assert group_segments([seg(0, 64, 64), seg(1000, 64, 64), seg(2500, 64, 64), seg(4000, 64, 64)]) == [
        (0, 2),
        (2, 2),
    ]  # the step changes after the second
    assert group_segments([seg(0, 64, 64), seg(1000, 64, 32), seg(2000, 64, 32)]) == [(0, 1), (1, 2)]
    assert group_segments([seg(1000, 64, 64), seg(0, 64, 64)]) == [(0, 1), (1, 1)]  # a step down
    assert group_segments([seg(0, 96, 64)]) == [(0, 1)]
    assert group_segments([]) == []


def test_a_per_layer_cache_is_one_group_of_every_k_and_v(caches):
    cache, _ = caches["per_layer"]
    assert [group.count for group in cache.groups] == [len(cache.layout.segments)]
