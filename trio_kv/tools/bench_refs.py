"""What the benches measure against, each in a process of its own, and how they drive load.

- ``echo``: a blocking pynng Rep0 socket that sends every message back: the least any
  request/reply server on the same transport can cost. Its clients are blocking Req0 sockets.
- ``serve``: ``trio-kv serve`` as a subprocess, so the server's event loop shares nothing
  with the clients that time it.
- ``redis``: ``redis-server`` on a unix socket, when one is on PATH, answering ``EXISTS`` of
  16 keys that its clients hash themselves (what a lookup of a 16-chunk prompt asks).
- load: N client *processes* (spawned, never forked: nng's threads do not survive a fork),
  started together at a barrier, each running one operation in a loop for a fixed time.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pynng

from ..client import BlockingClient
from ..keys import RequestKey, packed_key, token_count
from ..protocol import Lookup, encode
from .common import BenchFailed

_SPAWN = multiprocessing.get_context("spawn")

# Token ids are drawn from Llama 3's vocabulary (the shape bench cpu models), as an engine's
# are. Ids anywhere in [0, 2**32) would be two-digit Python ints, which cost the client 34
# instead of 21 us to pack per 4096 ids: a cost no tokenizer's output has.
VOCAB_SIZE = 128_256


def token_ids(rng: random.Random, count: int) -> list[int]:
    """``count`` random token ids of a real-sized vocabulary."""
    return [rng.randrange(VOCAB_SIZE) for _ in range(count)]


def progress(message: str) -> None:
    """One line on stderr, so a long bench shows where it is without touching its output."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (every thread) so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ------------------------------------------------------------ the echo reference


def echo_payload(key: RequestKey) -> bytes:
    """What the echo reference sends: as many bytes as the encoded Lookup of ``key``."""
    return bytes(len(encode(Lookup(packed_key(key)))))


def _echo(url: str) -> None:  # process entry point
    with pynng.Rep0(listen=url, recv_max_size=0) as sock:
        while True:
            sock.send(sock.recv())


@contextlib.contextmanager
def echo_server(url: str) -> Iterator[int]:
    """Run the echo server on ``url``; yields its pid once it answers."""
    process = _SPAWN.Process(target=_echo, args=(url,), daemon=True)
    process.start()
    try:
        _wait_dialable(url)
        with pynng.Req0(dial=url, block_on_dial=True, resend_time=-1, recv_timeout=30_000) as probe:
            probe.send(b"x")
            probe.recv()
        assert process.pid is not None
        yield process.pid
    finally:
        process.kill()
        process.join()


def _wait_dialable(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with pynng.Req0(dial=url, block_on_dial=True):
                return
        except pynng.NNGException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# ------------------------------------------------------------ trio-kv serve


@contextlib.contextmanager
def serve(
    url: str, *, admin_port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``trio-kv serve --listen url`` in a subprocess, with the admin API on ``admin_port``;
    yields once it answers a ping. Settings come in as ``TRIO_KV_*`` variables in ``env``."""
    command = [sys.executable, "-m", "trio_kv", "serve", "--listen", url, "--log-level", "warning"]
    command += ["--admin", f"127.0.0.1:{admin_port}"]
    # The server copies as this process does: it inherits GLIBC_TUNABLES (the non-temporal
    # threshold, nt_stores) and adds nothing of its own to it.
    process = subprocess.Popen(command, env={**os.environ, "TRIO_KV_COPY_NT_THRESHOLD": "0", **(env or {})})
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise BenchFailed(f"trio-kv serve exited with status {process.returncode}")
            try:
                with BlockingClient.connect(url, wait=True, timeout_s=1.0):
                    break
            except (TimeoutError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def admin_text(admin_port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=30) as reply:
        return str(reply.read().decode())


def histogram_counts(metrics_text: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a Prometheus histogram, +Inf last."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    return sorted(buckets)


def histogram_quantile(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]], q: float
) -> float:
    """The ``q`` quantile of the samples observed between two scrapes, interpolated in its
    bucket as Prometheus' histogram_quantile does (the +Inf bucket answers its lower bound)."""
    counts = [(bound, count - dict(before).get(bound, 0.0)) for bound, count in after]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = bound, cumulative
    return lower


# ------------------------------------------------------------ redis (optional)


def redis_path() -> str | None:
    return shutil.which("redis-server")


@contextlib.contextmanager
def redis_server(directory: str) -> Iterator[tuple[str, int]]:
    """``redis-server`` on a unix socket in ``directory``, no persistence; yields (path, pid)."""
    path = os.path.join(directory, "redis.sock")
    binary = redis_path()
    assert binary is not None
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", path, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield path, process.pid
    finally:
        process.terminate()
        process.wait()


def _resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class RedisExists:
    """A minimal RESP client: ``EXISTS`` of the chained hashes of a prompt's chunks."""

    def __init__(self, path: str, tokens: bytes, chunk_bytes: int) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.connect(path)
        self._tokens, self._chunk_bytes = tokens, chunk_bytes

    def hashes(self) -> list[bytes]:
        prev, out = b"", []
        for offset in range(0, len(self._tokens), self._chunk_bytes):
            prev = hashlib.blake2b(
                prev + self._tokens[offset : offset + self._chunk_bytes], digest_size=16
            ).digest()
            out.append(prev)
        return out

    def set_all(self) -> None:
        for key in self.hashes():
            self._sock.sendall(_resp(b"SET", key, b"1"))
            self._sock.recv(64)

    def exists(self) -> int:
        self._sock.sendall(_resp(b"EXISTS", *self.hashes()))
        reply = self._sock.recv(64)
        return int(reply[1:].split(b"\r\n", 1)[0])


# ------------------------------------------------------------ one client's latency


def percentile_us(samples_ns: Sequence[int], fraction: float) -> float:
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


def latency_samples(
    client: BlockingClient, keys: Sequence[RequestKey], echo_url: str, count: int, warmup: int
) -> tuple[list[list[int]], list[int]]:
    """Nanoseconds per lookup of each of ``keys`` and per echo of a message as large as the
    encoded Lookup; they alternate, so drift in the machine hits all alike. Warm-up samples
    (connections and caches settling) are dropped, not reported."""
    payload = echo_payload(keys[0])
    lookups: list[list[int]] = [[] for _ in keys]
    echoes = []
    with pynng.Req0(dial=echo_url, block_on_dial=True, resend_time=-1) as echo:
        for _ in range(warmup + count):
            for key, samples in zip(keys, lookups):
                start = time.perf_counter_ns()
                result = client.lookup(key)
                samples.append(time.perf_counter_ns() - start)
                if result.hit_tokens != token_count(key):
                    raise BenchFailed(f"lookup of a stored prompt found {result}")
            start = time.perf_counter_ns()
            echo.send(payload)
            echo.recv()
            echoes.append(time.perf_counter_ns() - start)
    return [samples[warmup:] for samples in lookups], echoes[warmup:]


# ------------------------------------------------------------ load from client processes


def _lookup_op(url: str, key: RequestKey) -> Callable[[], object]:
    client = BlockingClient.connect(url)
    return lambda: client.lookup(key)


def _echo_op(url: str, payload: bytes) -> Callable[[], object]:
    sock = pynng.Req0(dial=url, block_on_dial=True, resend_time=-1)

    def round_trip() -> bytes:
        sock.send(payload)
        return sock.recv()

    return round_trip


def _redis_op(path: str, tokens: bytes, chunk_bytes: int) -> Callable[[], object]:
    return RedisExists(path, tokens, chunk_bytes).exists


OPS: dict[str, Callable[..., Callable[[], object]]] = {
    "lookup": _lookup_op,
    "echo": _echo_op,
    "redis": _redis_op,
}


def _load_worker(op: str, args: tuple[Any, ...], seconds: float, results: Any, barrier: Any) -> None:
    call = OPS[op](*args)
    call()  # connected and warm before the clock starts
    barrier.wait()
    done, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        call()
        done += 1
    results.put(done)


def run_load(
    op: str, args: tuple[Any, ...], *, clients: int, seconds: float, server_pid: int
) -> tuple[float, float]:
    """Operations per second from ``clients`` processes running ``op`` for ``seconds``, and
    the server's CPU microseconds per operation over the same interval."""
    results, barrier = _SPAWN.Queue(), _SPAWN.Barrier(clients + 1)
    workers = [
        _SPAWN.Process(target=_load_worker, args=(op, args, seconds, results, barrier), daemon=True)
        for _ in range(clients)
    ]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=120)
        cpu_start, start = cpu_seconds(server_pid), time.perf_counter()
        total = sum(results.get(timeout=seconds + 120) for _ in workers)
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(server_pid) - cpu_start
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    return total / elapsed, cpu / max(total, 1) * 1e6
