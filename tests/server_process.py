"""Helpers for tests that kill and restart a real server over one fs directory.

``ServerProcess`` runs ``trio-kv serve --l2 fs:ROOT`` as a child process (the command a
user runs), finds its admin URL in its log and reads ``/v1/status``. ``Prompt`` fills
its own blocks of a shared-memory KV cache with random bytes and remembers a digest
per chunk, so a later retrieve, in another server process, can be compared byte for
byte. ``count_fs_objects`` recounts what is really in the fs directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from trio_kv.adapters import codec, fs_format
from trio_kv.adapters.fs_io import TEMP_PREFIX
from trio_kv.export.shm import SharedKVCache
from trio_kv.keys import ObjectKey, RequestKey, chunk_hashes
from trio_kv.testing import make_kv_cache

TRIO_KV = [sys.executable, "-m", "trio_kv"]
MODEL = "m"
BLOCK_SIZE = 16
CHUNK_SIZE = 64  # tokens: 4 blocks of 16 KiB, a 64 KiB object per chunk
BLOCKS_PER_CHUNK = CHUNK_SIZE // BLOCK_SIZE
_SERVING = re.compile(r"serving on .*admin: (http://\S+)\)")


class ServerProcess:
    """``trio-kv serve`` on ``ipc://<directory>/kv.sock`` with the fs tier ``fs_root``.
    Each start logs to a file of its own: a pipe nobody reads could fill and stall it."""

    def __init__(self, directory: Path, fs_root: Path, *, l1_size: str = "128MiB") -> None:
        self.directory = directory
        self.fs_root = fs_root
        self.url = f"ipc://{directory}/kv.sock"
        self.l1_size = l1_size
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_url = ""
        self.log_path = directory / "server-0.log"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and return once it serves (its recovery scan has finished)."""
        self.starts += 1
        self.log_path = self.directory / f"server-{self.starts}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_KV_")}
        command = [
            *TRIO_KV,
            "serve",
            "--listen",
            self.url,
            "--l1-size",
            self.l1_size,
            "--chunk-size",
            str(CHUNK_SIZE),
            "--l2",
            f"fs:{self.fs_root}?create=true",
            "--admin",
            "127.0.0.1:0",  # a free port: another server may hold the default one
            "--log-level",
            "info",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while (found := _SERVING.search(self.log())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start:\n{self.log()}")
            time.sleep(0.02)  # polling another process's log for readiness
        self.admin_url = found.group(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        """The admin ``/v1/status`` JSON."""
        with urllib.request.urlopen(self.admin_url + "/v1/status", timeout=10) as response:
            return dict(json.load(response))

    def fs_tier(self) -> dict[str, Any]:
        """The fs tier's entry in ``/v1/status``: usage, health, write-behind counters."""
        (tier,) = self.status()["l2"]
        return dict(tier)

    def kill(self, signum: int = signal.SIGKILL, timeout_s: float = 20.0) -> int:
        """Send ``signum`` and wait for the process to end; returns its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(timeout_s)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Prompt:
    """One prompt of ``chunks`` chunks under ``salt``, stored from blocks ``first_block``
    on. ``digests`` are of the bytes its blocks held when it was stored."""

    number: int
    salt: str
    chunks: int
    first_block: int
    digests: list[bytes] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        # Distinct from the first token on, so no two prompts share a chunk.
        start = (self.number + 1) * 100_000
        return list(range(start, start + self.chunks * CHUNK_SIZE))

    def key(self, *, rank: int | None = 0, request_id: str = "") -> RequestKey:
        return RequestKey(MODEL, 1, rank, self.tokens, request_id=request_id, cache_salt=self.salt)

    @property
    def blocks(self) -> list[int]:
        return list(range(self.first_block, self.first_block + self.chunks * BLOCKS_PER_CHUNK))

    def object_keys(self) -> list[ObjectKey]:
        return [ObjectKey(MODEL, 1, 0, h, self.salt) for h in chunk_hashes(self.tokens, CHUNK_SIZE)]

    def fill(self, kv: SharedKVCache) -> None:
        """Write fresh random bytes into this prompt's blocks (what a forward pass would
        leave there) and remember their digests."""
        region = _blocks_as_bytes(kv, self.first_block, len(self.blocks))
        region.random_(0, 256, generator=torch.Generator().manual_seed(self.number))
        self.digests = chunk_digests(kv, self.first_block, self.chunks)


def _blocks_as_bytes(kv: SharedKVCache, first: int, count: int) -> torch.Tensor:
    """Blocks ``[first, first + count)`` of a cross-layer KV cache as one uint8 tensor."""
    (tensor,) = kv.tensors
    assert kv.specs[0].block_dim == 0, "use layout='cross_layer': each block is contiguous"
    return tensor[first : first + count].view(torch.uint8)


def chunk_digests(kv: SharedKVCache, first_block: int, chunks: int) -> list[bytes]:
    """xxh3-128 of each chunk's bytes in the blocks from ``first_block`` on."""
    region = _blocks_as_bytes(kv, first_block, chunks * BLOCKS_PER_CHUNK).numpy()
    step = len(region) // chunks
    return [xxhash.xxh3_128_digest(region[i * step : (i + 1) * step]) for i in range(chunks)]


def make_cross_layer_kv_cache(num_blocks: int) -> SharedKVCache:
    """A KV cache whose blocks are contiguous 16 KiB runs (2 layers, 2 heads of 64, bf16)."""
    return make_kv_cache(
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        num_layers=2,
        num_kv_heads=2,
        head_size=64,
        layout="cross_layer",
    )


@dataclass
class FsRecount:
    """What the fs directory really holds: valid objects (by their headers), payload bytes
    in total and per salt, stale temp files and files that are not valid objects."""

    objects: set[ObjectKey] = field(default_factory=set)
    total_bytes: int = 0
    bytes_by_salt: Counter[str] = field(default_factory=Counter)
    temp_files: int = 0
    invalid_files: int = 0


def count_fs_objects(root: Path) -> FsRecount:
    """Recount ``root`` from the files themselves: every file named like an object whose
    header is valid and matches its name and size counts its payload bytes."""
    recount = FsRecount()
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        if path.name.startswith(TEMP_PREFIX):
            recount.temp_files += 1
            continue
        name = path.relative_to(root).as_posix()
        if codec.parse_name(name) is None:
            continue  # not an object (the quota file, say)
        data = path.read_bytes()
        try:
            header = fs_format.decode_header(data)
            key = fs_format.stored_key(header)
        except fs_format.HeaderError:
            recount.invalid_files += 1
            continue
        if fs_format.mismatch(header, file_size=len(data)) or codec.object_name(key) != name:
            recount.invalid_files += 1
            continue
        recount.objects.add(key)
        recount.total_bytes += header.payload_len
        recount.bytes_by_salt[key.cache_salt] += header.payload_len
    return recount
