"""``trio-kv bench cpu`` at a tiny size, and the split copies the CPU path uses for large jobs."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import trio

from trio_kv import cli
from trio_kv.client import BlockingClient
from trio_kv.export.shm import create_shared_kv_cache
from trio_kv.testing import make_kv_cache, running_server
from trio_kv.tools import bench_cpu, bench_cpu_copies
from trio_kv.tools.bench_memcpy import chunk_buffers, chunk_runs, memcpy_seconds, pieces_seconds
from trio_kv.transfer.cpu import CopyJob, CpuTransfer, MappedKVCache
from trio_kv.transfer.layout import KVLayout, Segment, plan_layout

REQUIRED_FIGURES = (
    "store_gbps",
    "retrieve_gbps",
    "memcpy_gbps",
    "memcpy_hot_gbps",
    "memcpy_pieces_gbps",
    "memcpy_pieces_retrieve_gbps",
    "store_pieces_ratio",
    "retrieve_pieces_ratio",
    "store_ratio",
    "retrieve_ratio",
    "lookup_p50_us",
    "lookup_p99_us",
    "nng_echo_p50_us",
    "lookup_ratio",
    "lookup_p99_ratio",
    "lookup_16_throughput_ratio",
    "server_cpu_us_per_lookup",
    "loop_lag_p99_ms",
    "metadata_bytes_per_chunk",
    "lookup_packed_p50_us",
    "lookup_packed_ratio",
    "lookup_16_packed_throughput_ratio",
)


def test_bench_cpu_json_reports_every_figure_with_ratios_of_the_figures(capsys):
    # Sync on purpose: main() calls trio.run itself.
    argv = ["bench", "cpu", "--json", "--chunks", "2", "--prompt-chunks", "1", "--layers", "2"]
    argv += ["--clients", "2", "--load-seconds", "0.3", "--metadata-chunks", "2000", "--lookup-chunks", "4"]
    status = cli.main([*argv, "--rounds", "1", "--lookups", "40"])

    assert status == 0
    report = json.loads(capsys.readouterr().out)
    for name in REQUIRED_FIGURES:
        value = report[name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)
    assert report["store_ratio"] == pytest.approx(report["store_gbps"] / report["memcpy_gbps"])
    assert report["retrieve_ratio"] == pytest.approx(report["retrieve_gbps"] / report["memcpy_gbps"])
    assert report["store_pieces_ratio"] == pytest.approx(report["store_gbps"] / report["memcpy_pieces_gbps"])
    assert report["retrieve_pieces_ratio"] == pytest.approx(
        report["retrieve_gbps"] / report["memcpy_pieces_retrieve_gbps"]
    )
    assert report["pieces_per_chunk"] == 2 * 2  # K and V of 2 layers, each one run of the chunk's blocks
    assert report["lookup_ratio"] == pytest.approx(report["lookup_p50_us"] / report["nng_echo_p50_us"])
    assert report["lookup_p99_ratio"] == pytest.approx(report["lookup_p99_us"] / report["nng_echo_p99_us"])
    assert report["lookup_packed_ratio"] == pytest.approx(
        report["lookup_packed_p50_us"] / report["nng_echo_p50_us"]
    )
    assert report["lookup_16_throughput_ratio"] == pytest.approx(
        report["lookup_16_throughput"] / report["echo_16_throughput"]
    )
    assert report["memcpy_threads"] == 2 and report["clients"] == 2 and report["lookup_chunks"] == 4
    assert isinstance(report["missed"], list)
    assert report["verified"] is True
    assert report["chunk_bytes"] == 2 * 2 * 256 * 8 * 128 * 2  # K and V, 2 layers, 256 tokens, bf16


@pytest.mark.parametrize("threads", [1, 3])
def test_the_memcpy_reference_copies_each_distinct_source_into_its_own_target(threads):
    sources, targets = chunk_buffers(3, 1001)  # not a multiple of threads
    for number, source in enumerate(sources):
        source.copy_(torch.randint(0, 256, source.shape, dtype=torch.uint8))
        assert not torch.equal(source, targets[number])
    with ThreadPoolExecutor(threads) as pool:
        assert memcpy_seconds(pool, threads, sources, targets) > 0
    assert all(torch.equal(source, target) for source, target in zip(sources, targets, strict=True))
    assert len({source.data_ptr() for source in sources} | {target.data_ptr() for target in targets}) == 6


def _strided_cache(num_blocks: int, piece: int) -> MappedKVCache:
    """K and V pieces interleaved block by block: two segments whose block stride is twice their
    piece, so a run of blocks is not one run of bytes."""
    region = torch.randint(0, 256, (num_blocks * 2 * piece,), dtype=torch.uint8)
    segments = (Segment(0, 2 * piece, piece), Segment(piece, 2 * piece, piece))
    return MappedKVCache(KVLayout(segments, num_blocks, 16, 2 * piece, 8), region)


@pytest.mark.parametrize("layout", ["per_layer", "cross_layer", "strided"])
@pytest.mark.parametrize("threads", [1, 3])
def test_the_pieces_references_copy_what_a_store_gathers_and_a_retrieve_scatters(layout, threads):
    # 5 blocks per chunk: one run per segment where its blocks' pieces are adjacent, else one per block.
    with contextlib.ExitStack() as stack:
        if layout == "strided":
            cache = _strided_cache(12, 4096)
        else:
            kv = stack.enter_context(make_kv_cache(num_blocks=12, num_layers=3, layout=layout))
            cache = CpuTransfer().open(kv.register_request("pieces"))
        chunk_bytes = cache.layout.chunk_bytes(5)
        runs = [chunk_runs(cache.layout, first, 5) for first in (0, 6)]
        assert all(sum(length for _, length in chunk) == chunk_bytes for chunk in runs)
        assert len(runs[0]) == {"per_layer": 2 * 3, "cross_layer": 1, "strided": 2 * 5}[layout]
        gathered = torch.zeros(2, chunk_bytes, dtype=torch.uint8)
        cache.gather([CopyJob(list(range(first, first + 5)), gathered[i]) for i, first in enumerate((0, 6))])
        targets = list(torch.zeros(2, chunk_bytes, dtype=torch.uint8))
        with ThreadPoolExecutor(threads) as pool:
            assert pieces_seconds(pool, threads, cache.region, runs, targets) > 0
            assert gathered.any() and torch.equal(torch.stack(targets), gathered)
        # The other way, as a retrieve: chunk 0 into blocks 6.., chunk 1 into blocks 0.. (swapped).
        original = cache.region.clone()
        cache.scatter([CopyJob(list(range(first, first + 5)), gathered[i]) for i, first in enumerate((6, 0))])
        scattered = cache.region.clone()
        cache.region.copy_(original)
        with ThreadPoolExecutor(threads) as pool:
            assert pieces_seconds(pool, threads, cache.region, runs[::-1], targets, into_region=True) > 0
        assert not torch.equal(scattered, original) and torch.equal(cache.region, scattered)


@pytest.mark.parametrize("layout", ["per_layer", "cross_layer"])
@pytest.mark.parametrize("parts", [2, 3])
def test_copies_split_into_parts_move_the_same_bytes_as_one_call(layout, parts):
    blocks_per_job = 5  # not a multiple of parts: shares differ in size and rotate per segment
    with make_kv_cache(num_blocks=40, num_layers=3, layout=layout) as kv:
        cache = CpuTransfer().open(kv.register_request("split"))
        chunk_bytes = cache.layout.chunk_bytes(blocks_per_job)
        sources = [[7, 3, 11, 0, 19], [2, 4, 6, 8, 10]]
        whole = torch.zeros(2 * chunk_bytes, dtype=torch.uint8)
        split = torch.zeros(2 * chunk_bytes, dtype=torch.uint8)

        def jobs(arena, block_ids, first_block=0):
            return [
                CopyJob(ids, arena[i * chunk_bytes : (i + 1) * chunk_bytes], first_block)
                for i, ids in enumerate(block_ids)
            ]

        cache.gather(jobs(whole, sources))
        for part in range(parts):
            cache.gather(jobs(split, sources), part, parts)
        assert torch.equal(whole, split)

        # Scatter from the third block of each chunk on, into blocks 20..29.
        targets = [list(range(20, 25)), list(range(25, 30))]
        untouched = {block: kv.block_bytes(block) for ids in targets for block in ids[:2]}
        for part in range(parts):
            cache.scatter(jobs(split, targets, first_block=2), part, parts)
        for source_ids, target_ids in zip(sources, targets):
            for position, (source, target) in enumerate(zip(source_ids, target_ids)):
                if position < 2:
                    assert kv.block_bytes(target) == untouched[target]
                else:
                    assert kv.block_bytes(target) == kv.block_bytes(source)


@pytest.mark.parametrize("rounds", [1, 2])
async def test_bench_cpu_runs_one_untimed_warm_up_round_before_the_timed_ones(rounds):
    # What the server stored says how many rounds ran: a cold lone round read as a 25x miss.
    args = argparse.Namespace(chunks=2, prompt_chunks=1, rounds=rounds, copy_threads=2)
    shape = {"num_layers": 2, "num_kv_heads": 8, "head_size": 128, "dtype": torch.bfloat16}
    with create_shared_kv_cache(num_blocks=4 * 16, block_size=16, layout="per_layer", **shape) as kv:
        async with (
            running_server(chunk_size=bench_cpu.CHUNK_TOKENS, no_admin=True) as server,
        ):
            client = await trio.to_thread.run_sync(BlockingClient.connect, server.url)
            with client:
                registered = await trio.to_thread.run_sync(client.register_kv_cache, bench_cpu.INSTANCE, kv)
                chunk_bytes = registered.block_bytes * 16
                layout = plan_layout(kv.specs, 16, kv.nbytes)
                target_block0 = args.chunks * 16  # retrieves land past the stored blocks
                pieces = (
                    kv.region,
                    *(
                        [chunk_runs(layout, first + 16 * i, 16) for i in range(args.chunks)]
                        for first in (0, target_block0)
                    ),
                )
                times = await trio.to_thread.run_sync(
                    bench_cpu_copies.copy_rounds, client, args, chunk_bytes, target_block0, pieces
                )
            stored = server.server.metrics.traffic_summary()["total"]["stored_bytes"]
    assert stored == (1 + rounds) * args.chunks * chunk_bytes
    assert all(0 < seconds < math.inf for seconds in times)


def test_bench_scaling_reports_each_table_with_ratios_of_its_own_figures(capsys):
    argv = ["bench", "scaling", "--json", "--max-cached", "1000", "--load-seconds", "0.3", "--rounds", "1"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["chunk_bytes"] for row in report["sizes"]] == [
        256 << 10,
        1 << 20,
        4 << 20,
        16 << 20,
        64 << 20,
    ]
    for row in report["sizes"]:
        assert row["store_ratio"] == pytest.approx(row["store_gbps"] / row["memcpy_gbps"])
    assert [row["clients"] for row in report["clients"]] == [1, 4, 16]
    for row in report["clients"]:
        assert (
            row["ratio"] == pytest.approx(row["lookups_per_s"] / row["echo_per_s"])
            and row["lookups_per_s"] > 0
        )
    assert [row["cached_chunks"] for row in report["cached"]] == [1000]
    assert report["cached"][0]["lookup_p50_us"] > 0
