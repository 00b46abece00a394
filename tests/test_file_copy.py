"""The preadv/pwritev path for plain KV files moves exactly the bytes the mapped path moves."""

from __future__ import annotations

import os
import random

import pytest
import torch

from trio_kv.errors import ErrorCode, TrioKVError
from trio_kv.export.shm import map_file
from trio_kv.testing import make_kv_cache
from trio_kv.transfer import CpuTransfer
from trio_kv.transfer.cpu import CopyJob, MappedKVCache
from trio_kv.transfer.file_copy import FileKVCache, _move_all

BLOCKS_PER_CHUNK = 4


def _jobs(rng: random.Random, num_blocks: int, chunk_bytes: int, count: int, *, skip: bool) -> list[CopyJob]:
    """Chunks over runs of consecutive blocks and over scattered ones, some skipping blocks;
    no block twice (as in one request)."""
    runs = list(range(num_blocks // 2))
    scattered = list(range(num_blocks // 2, num_blocks))
    rng.shuffle(scattered)
    jobs = []
    for n in range(count):
        pool = runs if n % 2 else scattered
        blocks, pool[:BLOCKS_PER_CHUNK] = pool[:BLOCKS_PER_CHUNK], []
        buffer = torch.randint(0, 256, (chunk_bytes,), dtype=torch.uint8)
        jobs.append(CopyJob(blocks, buffer, first_block=rng.randrange(BLOCKS_PER_CHUNK) if skip else 0))
    return jobs


@pytest.mark.parametrize("layout", ["per_layer", "cross_layer"])
@pytest.mark.parametrize("parts", [1, 3])
def test_a_plain_file_gathers_and_scatters_the_bytes_a_mapping_does(layout, parts):
    rng = random.Random(parts)
    with make_kv_cache(num_blocks=32, block_size=16, layout=layout, sealed=False) as kv:
        through_file = CpuTransfer().open(kv.register_request("file"))
        assert isinstance(through_file, FileKVCache)
        mapped = MappedKVCache(through_file.layout, map_file(kv.path, kv.nbytes))
        chunk_bytes = through_file.layout.chunk_bytes(BLOCKS_PER_CHUNK)

        stored = _jobs(rng, 32, chunk_bytes, 8, skip=False)
        expected = [CopyJob(j.block_ids, torch.zeros_like(j.buffer)) for j in stored]
        for part in range(parts):
            through_file.gather(stored, part, parts)
            mapped.gather(expected, part, parts)
        assert all(torch.equal(a.buffer, b.buffer) for a, b in zip(stored, expected))

        written = _jobs(rng, 32, chunk_bytes, 8, skip=True)
        before = kv.region.clone()
        for part in range(parts):
            through_file.scatter(written, part, parts)
        after_file = kv.region.clone()
        kv.region.copy_(before)
        for part in range(parts):
            mapped.scatter(written, part, parts)
        assert torch.equal(after_file, kv.region)
        assert not torch.equal(after_file, before)


def test_a_short_call_is_resumed_where_it_stopped():
    target = [memoryview(bytearray(5)), memoryview(bytearray(3)), memoryview(bytearray(4))]
    source = bytes(range(12))

    def read_at_most_two(fd, views, offset):
        moved = min(2, len(views[0]))
        views[0][:moved] = source[offset : offset + moved]
        return moved

    _move_all(read_at_most_two, -1, list(target), 0, lambda: AssertionError("not truncated"))
    assert b"".join(bytes(view) for view in target) == source


def test_a_truncated_file_is_a_transfer_failure_for_both_directions():
    with make_kv_cache(num_blocks=8, block_size=16, sealed=False) as kv:
        cache = CpuTransfer().open(kv.register_request("file"))
        job = CopyJob([0, 1, 2, 3], torch.zeros(cache.layout.chunk_bytes(4), dtype=torch.uint8))
        os.truncate(kv.path, 0)
        for copy in (cache.gather, cache.scatter):
            with pytest.raises(TrioKVError) as failed:
                copy([job])
            assert failed.value.code == ErrorCode.TRANSFER_FAILED
        assert os.stat(kv.path).st_size == 0  # the scatter did not grow it back
