"""Crash safety (issue #7, item 3): kill -9 during heavy fs writes, restart, lose nothing.

A real ``trio-kv serve`` with an fs tier and a small L1 is killed with SIGKILL several
times while concurrent clients store prompts as fast as they can and write-behind is
busy with them, each time after a random number of chunks has reached the disk. After
every restart on the same directory:

* no temp file is left (the recovery scan removes those of the killed writers);
* the fs tier's usage (admin ``/v1/status``) equals a recount of the object files on
  disk, in total and salt by salt;
* every prompt ever sent (acknowledged or cut off by the kill) is looked up and
  retrieved: it hits exactly the chunks whose objects are on disk, as a contiguous
  prefix, and every chunk served is byte-exact with what was stored for it;
* nothing written before the kill is lost.

Before the last restart, files are damaged the ways a crash, a power loss or bit rot
could damage them (a truncated object, a flipped payload byte, another key's file
under a name, a torn temp file): none of them may ever be served.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pynng
import pytest
import trio

from trio_kv.adapters import codec, fs_format
from trio_kv.adapters.fs import FsAdapter
from trio_kv.adapters.fs_io import TEMP_PREFIX
from trio_kv.client import AsyncClient
from trio_kv.core.l2_tier import L2Tier
from trio_kv.export.shm import SharedKVCache
from trio_kv.keys import ObjectKey

from .server_process import (
    BLOCKS_PER_CHUNK,
    CHUNK_SIZE,
    FsRecount,
    Prompt,
    ServerProcess,
    chunk_digests,
    count_fs_objects,
    make_cross_layer_kv_cache,
)

SEED = 20261123
KILLS = 3
# Smaller than what one life of the server stores: write-behind also races L1 eviction
# (about a third of the chunks are evicted before their turn), and reads after a
# restart load into a full L1.
L1_SIZE = "16MiB"
WRITERS = 4  # concurrent clients storing
READERS = 4  # concurrent clients checking after a restart
PROMPTS_PER_WRITER = 25  # per life of the server: bounds the bytes written
CHUNKS = 4  # per prompt; a chunk is a 64 KiB object
SALTS = ["", "alice", "bob"]
PROMPT_BLOCKS = CHUNKS * BLOCKS_PER_CHUNK
READ_BLOCKS_FROM = WRITERS * PROMPT_BLOCKS  # writers store from the blocks below, readers read above


async def test_kill_9_during_heavy_fs_writes_never_serves_a_torn_or_mismatched_chunk(tmp_path):
    rng = random.Random(SEED)
    root = tmp_path / "l2"
    prompts: list[Prompt] = []
    with (
        make_cross_layer_kv_cache(num_blocks=READ_BLOCKS_FROM + READERS * PROMPT_BLOCKS) as kv,
        ServerProcess(tmp_path, root, l1_size=L1_SIZE) as server,
    ):
        for _ in range(KILLS):
            await trio.to_thread.run_sync(server.start)
            await check_after_restart(server, kv, prompts, root)
            written = await store_until_killed(server, kv, prompts, rng)
            left = await trio.to_thread.run_sync(count_fs_objects, root)
            assert len(left.objects) >= written, "chunks written before the kill are gone"

        damaged = await trio.to_thread.run_sync(damage_files, root, prompts, rng)
        await trio.to_thread.run_sync(server.start)
        await check_after_restart(server, kv, prompts, root, payload_flipped=damaged.payload_flipped)
        for path in damaged.paths:
            assert not path.exists(), f"{path} is invalid but was not removed"
        assert server.kill(signal.SIGTERM) == 0, server.log()


# ------------------------------------------------------------ storing until the kill


async def store_until_killed(
    server: ServerProcess, kv: SharedKVCache, prompts: list[Prompt], rng: random.Random
) -> int:
    """Store prompts from WRITERS concurrent clients and kill -9 the server once a random
    number of chunks has been written behind. Returns how many it had written by then."""
    threshold = rng.randrange(40, 200)
    async with await AsyncClient.connect(server.url, timeout_s=10) as client:
        await client.register_kv_cache("w", kv)

        killed = trio.Event()

        async def writer(index: int) -> None:
            for _ in range(PROMPTS_PER_WRITER):
                prompt = Prompt(len(prompts), SALTS[len(prompts) % len(SALTS)], CHUNKS, index * PROMPT_BLOCKS)
                prompt.fill(kv)
                prompts.append(prompt)  # before it is sent: a store cut off by the kill may land
                try:
                    await client.store("w", prompt.key(), prompt.blocks)
                except pynng.NNGException:
                    if killed.is_set():
                        return  # the connection died with the server
                    raise

        async with trio.open_nursery() as nursery:
            for index in range(WRITERS):
                nursery.start_soon(writer, index)
            tier = await poll_fs_tier(server, lambda tier: tier["written"] >= threshold)
            killed.set()
            await trio.to_thread.run_sync(server.kill)
            nursery.cancel_scope.cancel()
    return int(tier["written"])


async def poll_fs_tier(server: ServerProcess, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            tier = await trio.to_thread.run_sync(server.fs_tier)
            if done(tier):
                return tier
            await trio.sleep(0.005)  # polling another process


# ------------------------------------------------------------ checks after a restart


async def check_after_restart(
    server: ServerProcess,
    kv: SharedKVCache,
    prompts: list[Prompt],
    root: Path,
    *,
    payload_flipped: frozenset[ObjectKey] = frozenset(),
) -> None:
    """The checks listed in the module docstring. ``payload_flipped`` objects pass the
    recovery scan (it reads headers only) but must fail their checksum when read."""
    recount = await trio.to_thread.run_sync(count_fs_objects, root)
    assert recount.temp_files == 0, "the recovery scan left temp files"
    assert recount.invalid_files == 0, "the recovery scan left invalid files"
    await assert_usage_is(server, recount)

    mismatches: list[str] = []
    async with await AsyncClient.connect(server.url, timeout_s=10) as client:
        await client.register_kv_cache("w", kv)

        async def reader(index: int) -> None:
            first_block = READ_BLOCKS_FROM + index * PROMPT_BLOCKS
            for prompt in prompts[index::READERS]:
                expected = servable_prefix(prompt, recount, payload_flipped)
                request_id = f"check-{server.starts}-{prompt.number}"
                found = await client.lookup(prompt.key(rank=None, request_id=request_id))
                assert (found.hit_tokens, found.l1_chunks) == (expected * CHUNK_SIZE, 0), (
                    f"prompt {prompt.number}"
                )
                if not expected:
                    continue
                destination = list(range(first_block, first_block + len(prompt.blocks)))
                got = await client.retrieve("w", prompt.key(request_id=request_id), destination)
                assert got.chunks_written == expected
                served = chunk_digests(kv, first_block, expected)
                mismatches.extend(
                    f"prompt {prompt.number} chunk {i}"
                    for i, (a, b) in enumerate(zip(served, prompt.digests))
                    if a != b
                )

        async with trio.open_nursery() as nursery:
            for index in range(READERS):
                nursery.start_soon(reader, index)
    assert not mismatches, f"served bytes differ from the stored ones: {mismatches}"
    status = await trio.to_thread.run_sync(server.status)
    assert status["leases"] == 0
    # Reads removed the objects whose payload failed its checksum: usage followed.
    await assert_usage_is(server, await trio.to_thread.run_sync(count_fs_objects, root))


def servable_prefix(prompt: Prompt, recount: FsRecount, payload_flipped: frozenset[ObjectKey]) -> int:
    """How many leading chunks of ``prompt`` are valid objects on disk."""
    count = 0
    for key in prompt.object_keys():
        if key not in recount.objects or key in payload_flipped:
            break
        count += 1
    return count


async def assert_usage_is(server: ServerProcess, recount: FsRecount) -> None:
    usage = (await trio.to_thread.run_sync(server.fs_tier))["usage"]
    assert usage["total_bytes_used"] == recount.total_bytes
    assert usage["bytes_by_salt"] == dict(recount.bytes_by_salt)


# ------------------------------------------------------------ damage


class Damage(NamedTuple):
    paths: list[Path]  # files the restarted server must remove (the flipped one once read)
    payload_flipped: frozenset[ObjectKey]


def damage_files(root: Path, prompts: list[Prompt], rng: random.Random) -> Damage:
    """Damage chunk 1 of three prompts whose objects are all on disk: truncate one (a
    torn file), flip a payload byte of another (bit rot), copy another key's file over
    the third; and leave a torn temp file beside an object."""
    on_disk = count_fs_objects(root).objects
    whole = [p for p in prompts if all(k in on_disk for k in p.object_keys())]
    torn, flipped, replaced, source = (p.object_keys() for p in rng.sample(whole, 4))

    def path(key: ObjectKey) -> Path:
        return root / codec.object_name(key)

    os.truncate(path(torn[1]), path(torn[1]).stat().st_size - 100)
    data = bytearray(path(flipped[1]).read_bytes())
    data[-1] ^= 0x01
    path(flipped[1]).write_bytes(data)
    shutil.copyfile(path(source[0]), path(replaced[1]))
    stale = path(source[1]).with_name(f"{TEMP_PREFIX}{path(source[1]).name}.99999.0badf00d")
    stale.write_bytes(path(source[1]).read_bytes()[: fs_format.ALIGN + 1000])
    return Damage([path(torn[1]), path(flipped[1]), path(replaced[1]), stale], frozenset({flipped[1]}))


# ------------------------------------------------------------ torn files, at the adapter

SEGMENT = 4096  # several checksum segments per object
PAYLOAD = 3 * SEGMENT + 100
CUTS = [
    "empty",
    "in-fixed-header",
    "in-key-record",
    "in-checksums",
    "header-only",
    "mid-payload",
    "one-byte-short",
    "one-byte-long",
]


def tear(path: Path, cut: str) -> None:
    """Leave the object file at ``path`` as a write cut at ``cut`` would (or, for
    "one-byte-long", a byte longer than its header says)."""
    data = path.read_bytes()
    header = fs_format.decode_header(data)
    record_end = fs_format.FIXED_BYTES + len(header.key_record)
    if cut == "one-byte-long":
        path.write_bytes(data + b"\0")
        return
    length = {
        "empty": 0,
        "in-fixed-header": fs_format.FIXED_BYTES // 2,
        "in-key-record": record_end - 1,
        "in-checksums": record_end + 4,
        "header-only": header.header_len,
        "mid-payload": header.header_len + SEGMENT + 17,
        "one-byte-short": len(data) - 1,
    }[cut]
    path.write_bytes(data[:length])


def object_payload(key: ObjectKey) -> bytes:
    return random.Random(key.chunk_hash).randbytes(PAYLOAD)


async def store_two_and_tear_one(
    root: Path, cut: str
) -> tuple[L2Tier[FsAdapter], ObjectKey, ObjectKey, Path]:
    """Store two objects and cut the first one's file at ``cut``. Returns the tier,
    the torn key, the intact key and the torn file."""
    tier = L2Tier(FsAdapter(str(root)))
    tier.adapter.segment_size = SEGMENT
    torn_key, intact_key = (ObjectKey("m", 1, 0, bytes([n]) * 16, "t") for n in (1, 2))
    for key in (torn_key, intact_key):
        await tier.put(key, memoryview(object_payload(key)))
    path = Path(tier.adapter.path_of(torn_key))
    tear(path, cut)
    return tier, torn_key, intact_key, path


@pytest.mark.parametrize("cut", CUTS)
async def test_a_torn_object_file_is_a_miss_when_read_and_is_removed(tmp_path, cut):
    tier, torn_key, intact_key, path = await store_two_and_tear_one(tmp_path, cut)
    assert not await tier.get_into(torn_key, memoryview(bytearray(PAYLOAD)))
    assert not path.exists()
    assert tier.adapter.invalid_removed == 1
    assert tier.usage().total_bytes_used == PAYLOAD  # the intact object only
    target = bytearray(PAYLOAD)
    assert await tier.get_into(intact_key, memoryview(target))
    assert bytes(target) == object_payload(intact_key)


@pytest.mark.parametrize("cut", CUTS)
async def test_a_torn_object_file_is_removed_by_the_recovery_scan(tmp_path, cut):
    _, _, intact_key, path = await store_two_and_tear_one(tmp_path, cut)
    restarted = L2Tier(FsAdapter(str(tmp_path)))
    assert await restarted.recover() == 1
    assert not path.exists()
    assert restarted.adapter.invalid_removed == 1
    assert list(restarted.ledger.least_recent()) == [intact_key]
    assert restarted.usage().total_bytes_used == PAYLOAD
