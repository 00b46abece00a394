"""The filesystem L2 adapter, under a tier, against real files in a temporary directory."""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import threading
from pathlib import Path

import pytest
import trio

from trio_kv.adapters import codec, fs, fs_format, fs_io, fs_scan
from trio_kv.adapters.base import AdapterError
from trio_kv.adapters.fs import FsAdapter
from trio_kv.adapters.fs_scan import ScanProgress
from trio_kv.core.engine import CacheEngine, EngineSettings
from trio_kv.core.l1 import L1Store
from trio_kv.core.l2_tier import L2Tier
from trio_kv.core.tiering import Tiering, TieringSettings
from trio_kv.keys import ObjectKey, RequestKey
from trio_kv.protocol import Lookup, Retrieve, Store
from trio_kv.testing import make_kv_cache
from trio_kv.transfer import CpuTransfer

SIZE = 10_000
LONG_MODEL = "org/" + "m" * 296  # 300 characters: stored under a digest name


def key(n: int, salt: str = "", model: str = "m") -> ObjectKey:
    return ObjectKey(model, 1, 0, n.to_bytes(16, "little"), salt)


def payload(n: int, size: int = SIZE) -> memoryview:
    return memoryview(random.Random(n).randbytes(size))


def buffer(size: int = SIZE) -> memoryview:
    return memoryview(bytearray(size))


def files(root: Path) -> list[str]:
    """Every regular file under ``root`` (temp files included), relative."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def small_segments(tier: L2Tier[FsAdapter]) -> L2Tier[FsAdapter]:
    """Several checksum segments per object, read by two threads."""
    tier.adapter.segment_size = 4096
    tier.adapter.split_min_bytes = 2 * 4096
    tier.adapter.cpus = 2 * fs.READ_PARTS
    return tier


async def recovered(root: Path) -> L2Tier[FsAdapter]:
    tier = L2Tier(FsAdapter(str(root)))
    await tier.recover()
    return tier


# ------------------------------------------------------------ put, get, contains, delete


@pytest.mark.parametrize("size", [0, 1, 4096, SIZE, 5 * 4096])
async def test_put_then_get_into_returns_the_same_bytes(tmp_path, size):
    tier = small_segments(L2Tier(FsAdapter(str(tmp_path))))
    assert await tier.put(key(1), payload(1, size))
    target = buffer(size)
    assert await tier.get_into(key(1), target)
    assert bytes(target) == bytes(payload(1, size))


async def test_an_object_is_one_file_at_its_codec_name_holding_header_and_payload(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    await tier.put(key(1, "tenant"), payload(1))
    assert files(tmp_path) == [codec.object_name(key(1, "tenant"))]
    data = (tmp_path / codec.object_name(key(1, "tenant"))).read_bytes()
    header = fs_format.decode_header(data)
    assert fs_format.stored_key(header) == key(1, "tenant")
    assert data[header.header_len :] == bytes(payload(1))


async def test_a_second_put_of_a_present_key_returns_false_and_counts_nothing(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    assert await tier.put(key(1), payload(1))
    assert not await tier.put(key(1), payload(1))
    assert tier.ledger.total == SIZE


async def test_get_into_a_missing_key_is_a_miss(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    assert not await tier.get_into(key(1), buffer())
    assert tier.adapter.invalid_removed == 0


async def test_contains_answers_for_a_whole_batch(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    await tier.put(key(1), payload(1))
    await tier.put(key(3, "b"), payload(3))
    assert await tier.contains([key(1), key(2), key(3, "b"), key(3)]) == [True, False, True, False]


async def test_delete_removes_the_file_and_a_missing_key_is_fine(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    await tier.put(key(1), payload(1))
    assert await tier.delete([key(1), key(2)]) == 2
    assert files(tmp_path) == []
    assert await tier.contains([key(1)]) == [False]


async def test_the_ledger_counts_exact_payload_bytes_per_salt(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    await tier.put(key(1, "a"), payload(1, 100))
    await tier.put(key(2, "a"), payload(2, 200))
    await tier.put(key(3, "b"), payload(3, 300))
    await tier.put(key(4), payload(4, 400))
    await tier.delete([key(2, "a"), key(4)])
    usage = tier.usage()
    assert usage.total_bytes_used == 400
    assert usage.bytes_by_salt == {"a": 100, "b": 300}


async def test_each_salt_lives_under_its_codec_prefix(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    for n, salt in enumerate(["", "a", "team/x"]):
        await tier.put(key(n, salt), payload(n))
        assert tier.adapter.path_of(key(n, salt)).startswith(str(tmp_path / codec.salt_prefix(salt)))
    assert [len(files(tmp_path / codec.salt_prefix(salt))) for salt in ["", "a", "team/x"]] == [1, 1, 1]


async def test_a_buffer_of_another_size_is_a_miss_and_the_file_is_removed(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    await tier.put(key(1), payload(1))
    assert not await tier.get_into(key(1), buffer(SIZE + 1))
    assert files(tmp_path) == []
    assert tier.ledger.total == 0


async def test_the_adapter_alone_does_plain_io_and_keeps_no_books(tmp_path):
    adapter = FsAdapter(str(tmp_path))
    await adapter.put(key(1), payload(1))
    await adapter.put(key(1), payload(2))  # no ledger to refuse it: the file is replaced
    target = buffer()
    assert await adapter.get_into(key(1), target)
    assert bytes(target) == bytes(payload(2))
    assert [found async for found in adapter.scan()] == [(key(1), SIZE)]
    await adapter.delete([key(1), key(2)])
    assert await adapter.contains([key(1)]) == [False]


# ------------------------------------------------------------ invalid files


def truncate_payload(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 10)


def truncate_header(path: Path) -> None:
    os.truncate(path, 100)


def flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[fs_format.FIXED_BYTES + 3] ^= 0x01
    path.write_bytes(data)


def flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(data)


def foreign_content(path: Path) -> None:
    path.write_bytes(b"not a trio-kv object\n" * 100)


def copy_file(source: Path, target: Path, size: int | None = None) -> None:
    """Write the first ``size`` bytes (all by default) of ``source`` to ``target``."""
    target.write_bytes(source.read_bytes()[:size])


CORRUPTIONS = {
    "torn-payload": truncate_payload,
    "torn-header": truncate_header,
    "flipped-header-byte": flip_header_byte,
    "flipped-payload-byte": flip_payload_byte,
    "foreign-content": foreign_content,
}


async def put_and_corrupt(tier: L2Tier[FsAdapter], model: str, corruption: str) -> Path:
    """Store keys 1 and 2 of ``model``; damage key 1's file (``corruption`` of CORRUPTIONS,
    or "other-key": key 2's file copied over key 1's name). Returns key 1's path."""
    await tier.put(key(1, model=model), payload(1))
    await tier.put(key(2, model=model), payload(2))
    path = Path(tier.adapter.path_of(key(1, model=model)))
    if corruption == "other-key":
        copy_file(Path(tier.adapter.path_of(key(2, model=model))), path)
    else:
        CORRUPTIONS[corruption](path)
    return path


ALL_CORRUPTIONS = [*CORRUPTIONS, "other-key"]


@pytest.mark.parametrize("model", ["m", LONG_MODEL], ids=["plain-name", "digest-name"])
@pytest.mark.parametrize("corruption", ALL_CORRUPTIONS)
async def test_an_invalid_file_is_a_miss_is_removed_and_is_not_counted_after_recovery(
    tmp_path, corruption, model
):
    tier = small_segments(L2Tier(FsAdapter(str(tmp_path))))
    path = await put_and_corrupt(tier, model, corruption)
    assert not await tier.get_into(key(1, model=model), buffer())
    assert not path.exists()
    assert tier.adapter.invalid_removed == 1
    assert tier.ledger.total == SIZE  # key 2 only
    again = await recovered(tmp_path)
    assert again.usage() == tier.usage()


@pytest.mark.parametrize("model", ["m", LONG_MODEL], ids=["plain-name", "digest-name"])
@pytest.mark.parametrize("corruption", [c for c in ALL_CORRUPTIONS if c != "flipped-payload-byte"])
async def test_recovery_removes_invalid_files_without_reading_them_first(tmp_path, corruption, model):
    path = await put_and_corrupt(L2Tier(FsAdapter(str(tmp_path))), model, corruption)
    tier = await recovered(tmp_path)
    assert not path.exists()
    assert tier.adapter.invalid_removed == 1
    assert list(tier.ledger.least_recent()) == [key(2, model=model)]


async def test_a_payload_byte_flipped_after_recovery_is_found_on_read(tmp_path):
    # Recovery checks headers and sizes only; payload checksums are verified on every read.
    path = await put_and_corrupt(L2Tier(FsAdapter(str(tmp_path))), "m", "flipped-payload-byte")
    tier = small_segments(await recovered(tmp_path))
    assert tier.ledger.total == 2 * SIZE
    assert not await tier.get_into(key(1), buffer())
    assert not path.exists()
    assert tier.ledger.total == SIZE


# ------------------------------------------------------------ recovery


async def test_recovery_rebuilds_identical_usage_including_digest_named_keys(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    stored = [key(1), key(2, "a"), key(3, "b"), key(4, model=LONG_MODEL), key(5, "a", LONG_MODEL)]
    for n, k in enumerate(stored):
        await tier.put(k, payload(n, 1000 + n))
    assert codec.parse_name(codec.object_name(stored[3])).digest_named
    again = await recovered(tmp_path)
    assert again.usage() == tier.usage()
    assert {k: again.ledger.size_of(k) for k in stored} == {k: tier.ledger.size_of(k) for k in stored}
    target = buffer(1003)
    assert await again.get_into(key(4, model=LONG_MODEL), target)
    assert bytes(target) == bytes(payload(3, 1003))


async def test_recovery_skips_and_counts_foreign_files_without_removing_them(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    await tier.put(key(1), payload(1))
    (tmp_path / "README").write_text("hello")
    (tmp_path / "v1" / "elsewhere.bin").write_bytes(b"\0" * 10)
    again = await recovered(tmp_path)
    assert again.adapter.foreign_files == 2
    assert (tmp_path / "README").exists() and (tmp_path / "v1" / "elsewhere.bin").exists()
    assert again.ledger.total == SIZE


async def test_recovery_removes_a_temp_file_left_by_a_crash(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    await tier.put(key(1), payload(1))
    final = Path(tier.adapter.path_of(key(1)))
    stale = final.with_name(f"{fs_io.TEMP_PREFIX}{final.name}.12345.deadbeef")
    copy_file(final, stale, 5000)  # a writer killed mid-write
    again = await recovered(tmp_path)
    assert not stale.exists()
    assert again.adapter.temps_removed == 1
    assert files(tmp_path) == [codec.object_name(key(1))]
    assert again.ledger.total == SIZE


async def test_recovery_of_an_absent_root_creates_it_and_finds_nothing(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path / "new" / "root")))
    assert await tier.recover() == 0
    assert (tmp_path / "new" / "root").is_dir()
    assert tier.health().healthy


async def test_the_recovery_scan_reports_its_progress(tmp_path, monkeypatch):
    reports: list[tuple[int, int | None]] = []

    class RecordingProgress(ScanProgress):
        def update(self, done, total):
            reports.append((done, total))

    monkeypatch.setattr(fs_scan, "ScanProgress", RecordingProgress)
    monkeypatch.setattr(fs_scan, "SCAN_BATCH", 2)
    tier = L2Tier(FsAdapter(str(tmp_path)))
    for n in range(5):
        await tier.put(key(n), payload(n, 10))
    assert (await recovered(tmp_path)).ledger.total == 50
    checked = [done for done, total in reports if total == 5]
    assert len(checked) == 3 and checked == sorted(checked) and checked[-1] == 5  # one per batch of 2


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_scan_progress_stays_silent_for_the_first_second_then_draws_a_bar():
    now = [0.0]
    terminal = FakeTerminal()
    progress = ScanProgress("scan", stream=terminal, clock=lambda: now[0])
    progress.update(10, 100)
    assert terminal.getvalue() == ""
    now[0] = 1.5
    progress.update(50, 100)
    assert "\rscan: [" in terminal.getvalue() and " 50% 50/100 files" in terminal.getvalue()
    now[0] = 2.0
    progress.update(100, 100)
    progress.finish()
    assert terminal.getvalue().endswith("100% 100/100 files (2 s)\x1b[K\n")


def test_a_quick_scan_shows_nothing():
    terminal = FakeTerminal()
    progress = ScanProgress("scan", stream=terminal, clock=lambda: 0.5)
    progress.update(100, 100)
    progress.finish()
    assert terminal.getvalue() == ""


def test_scan_progress_logs_instead_when_the_stream_is_not_a_terminal(caplog):
    now = [0.0]
    stream = io.StringIO()
    progress = ScanProgress("scan", stream=stream, clock=lambda: now[0])
    now[0] = 2.0
    with caplog.at_level(logging.INFO, logger="trio_kv.adapters.fs_scan"):
        progress.update(3, None)
        progress.update(4, None)  # within 5 s of the last line: not logged
        now[0] = 8.0
        progress.update(5, 10)
    assert stream.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == [
        "scan: 3 files listed (2 s)",
        caplog.records[1].getMessage(),
    ]
    assert "50% 5/10 files" in caplog.records[1].getMessage()


# ------------------------------------------------------------ eviction and cancellation


async def test_capacity_eviction_deletes_least_recent_files_and_never_a_pinned_key(tmp_path):
    tier = L2Tier(FsAdapter(str(tmp_path)), capacity=10 * SIZE, high_watermark=0.8, low_watermark=0.5)
    evicted = trio.Event()
    tier.ledger.add_key_listener(
        lambda event, keys: evicted.set() if event == "remove" and tier.ledger.total <= 5 * SIZE else None
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)
        for n in range(8):
            await tier.put(key(n), payload(n))
        tier.pin(key(0))  # the oldest, but a lookup is loading it
        assert await tier.get_into(key(1), buffer())  # 1 is now recent
        await tier.put(key(8), payload(8))  # 9 objects: over 80%
        with trio.fail_after(10):
            await evicted.wait()
        nursery.cancel_scope.cancel()
    kept = {key(n) for n in (0, 1, 6, 7, 8)}
    assert set(tier.ledger.least_recent()) == kept
    assert files(tmp_path) == sorted(codec.object_name(k) for k in kept)


async def test_a_put_cancelled_mid_write_leaves_no_file_and_the_ledger_unchanged(tmp_path, monkeypatch):
    tier = L2Tier(FsAdapter(str(tmp_path)))
    await tier.put(key(1), payload(1))
    usage = tier.usage()
    writing, release = threading.Event(), threading.Event()
    real_pwrite_all = fs_io.pwrite_all

    def slow_pwrite_all(fd, data, offset):
        writing.set()
        release.wait()
        real_pwrite_all(fd, data, offset)

    monkeypatch.setattr(fs_io, "pwrite_all", slow_pwrite_all)
    cancel_scope = trio.CancelScope()

    async def put() -> None:
        with cancel_scope:
            await tier.put(key(2), payload(2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put)
        await trio.to_thread.run_sync(writing.wait)
        cancel_scope.cancel()
        release.set()
    assert cancel_scope.cancelled_caught
    assert files(tmp_path) == [codec.object_name(key(1))]
    assert tier.usage() == usage
    assert key(2) not in tier.ledger


# ------------------------------------------------------------ failures and health


async def test_a_full_disk_fails_the_put_marks_unhealthy_and_leaves_no_temp_file(tmp_path, monkeypatch):
    tier = L2Tier(FsAdapter(str(tmp_path)))

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fs_io, "pwrite_all", disk_full)
    with pytest.raises(AdapterError, match="No space left"):
        await tier.put(key(1), payload(1))
    assert tier.adapter.enospc_errors == 1
    health = tier.health()
    assert not health.healthy and health.state == "disk-full" and str(tmp_path) in health.reason
    assert files(tmp_path) == []
    assert tier.ledger.total == 0
    monkeypatch.undo()
    assert await tier.put(key(1), payload(1))
    assert tier.health().healthy


async def test_an_unwritable_root_fails_puts_and_is_unhealthy(tmp_path):
    (tmp_path / "a-file").write_text("")
    tier = L2Tier(FsAdapter(str(tmp_path / "a-file" / "root")))  # cannot be a directory, even for root
    assert await tier.recover() == 0
    assert not tier.health().healthy
    with pytest.raises(AdapterError):
        await tier.put(key(1), payload(1))
    health = tier.health()
    assert not health.healthy and health.state == "unwritable"
    assert await tier.contains([key(1)]) == [False]
    assert not await tier.get_into(key(1), buffer())


# ------------------------------------------------------------ O_DIRECT


def record_open_flags(monkeypatch, refuse_direct: bool = False) -> list[int]:
    flags_seen: list[int] = []
    real_open = os.open

    def open_(path, flags, mode=0o777, **kwargs):
        flags_seen.append(flags)
        if refuse_direct and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    return flags_seen


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")
@pytest.mark.parametrize("size", [SIZE, fs_io.DIRECT_CHUNK + 3 * 4096 + 5])
async def test_o_direct_round_trips_unaligned_sizes(tmp_path, monkeypatch, size):
    tier = small_segments(L2Tier(FsAdapter(str(tmp_path), o_direct=True)))
    tier.adapter.segment_size = 1024 * 1024
    flags_seen = record_open_flags(monkeypatch)
    await tier.put(key(1), payload(1, size))
    target = buffer(size)
    assert await tier.get_into(key(1), target)
    if not tier.adapter.o_direct:
        pytest.skip(f"the filesystem under {tmp_path} refuses O_DIRECT")
    assert bytes(target) == bytes(payload(1, size))
    assert flags_seen and all(flags & os.O_DIRECT for flags in flags_seen)
    assert (tmp_path / codec.object_name(key(1))).stat().st_size == fs_format.ALIGN + size
    assert (await recovered(tmp_path)).ledger.total == size


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")
async def test_a_filesystem_refusing_o_direct_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    tier = L2Tier(FsAdapter(str(tmp_path), o_direct=True))
    record_open_flags(monkeypatch, refuse_direct=True)
    with caplog.at_level(logging.WARNING, logger="trio_kv.adapters.fs_io"):
        for n in range(3):
            await tier.put(key(n), payload(n))
            target = buffer()
            assert await tier.get_into(key(n), target)
            assert bytes(target) == bytes(payload(n))
    assert not tier.adapter.o_direct
    assert [r.getMessage() for r in caplog.records if "O_DIRECT" in r.getMessage()] == [
        caplog.records[0].getMessage()
    ]
    assert files(tmp_path) == sorted(codec.object_name(key(n)) for n in range(3))


# ------------------------------------------------------------ under the engine


async def test_the_engine_writes_chunks_behind_to_files_and_loads_them_back_after_l1_loses_them(tmp_path):
    chunk, block = 32, 16
    tokens = list(range(1000, 1000 + 4 * chunk))
    tier = L2Tier(FsAdapter(str(tmp_path)))
    written = trio.Event()
    tier.ledger.add_key_listener(lambda event, keys: written.set() if len(tier.ledger) == 4 else None)
    with make_kv_cache(num_blocks=64, block_size=block, num_layers=2) as kv:
        l1 = L1Store(8 << 20)
        engine = CacheEngine(
            EngineSettings(chunk_size=chunk),
            l1,
            CpuTransfer(),
            tiering=Tiering(l1, [tier], TieringSettings()),
        )
        engine.register(kv.register_request("w"))
        async with trio.open_nursery() as nursery:
            await nursery.start(tier.run)
            await nursery.start(engine.tiering.run)
            await engine.store(Store("w", RequestKey("m", 1, 0, tokens), list(range(8))))
            with trio.fail_after(10):
                await written.wait()
            l1.clear()
            found = await engine.lookup(Lookup(RequestKey("m", 1, None, tokens, request_id="r")))
            assert (found.hit_tokens, found.l2_chunks) == (4 * chunk, 4)
            got = await engine.retrieve(
                Retrieve("w", RequestKey("m", 1, 0, tokens, request_id="r"), list(range(20, 28)))
            )
            assert got.chunks_written == 4
            assert all(kv.block_bytes(src) == kv.block_bytes(src + 20) for src in range(8))
            nursery.cancel_scope.cancel()
    assert len(files(tmp_path)) == 4
    assert (await recovered(tmp_path)).usage() == tier.usage()
