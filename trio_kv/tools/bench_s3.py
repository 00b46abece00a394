"""``trio-kv bench s3``: the S3 adapter's put/get throughput beside raw boto3, same endpoint, same run.

Both sides move the same bytes (``--chunks`` objects of ``--chunk-mib`` MiB of random
data) to the same bucket of the same endpoint, one object at a time:

* **adapter**: ``S3Adapter.put`` of memoryview slices of a torch uint8 tensor (as L1
  hands them out), then ``S3Adapter.get_into`` into slices of a second tensor, from
  inside ``trio.run``: every call goes through trio-kv's worker-thread bridge, retry
  loop, circuit breaker and ledger (and, above the multipart threshold, parallel parts).
* **direct**: boto3 alone, in one worker thread, no trio-kv: ``put_object`` of the same
  bytes already held as ``bytes`` objects, and ``get_object()["Body"].read()``, with a
  client configured like the adapter's (``s3_transport.make_client``: same timeouts, no
  checksum pass, no payload signing), so the two differ only by what trio-kv adds.

An untimed warm-up round comes first. Rounds alternate which side goes first; each
side writes fresh objects and deletes them before the other side starts. Figures are total bytes over total seconds across rounds; the ratios
are adapter over direct. Without ``--endpoint``, a moto S3 server is started in this
process on 127.0.0.1 (with fake credentials if none are set). That server shares this
process and its GIL and is most of the cost, so its figures say what trio-kv adds on
top of boto3, not what S3 can do.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import botocore.exceptions
import msgspec
import torch
import trio

from ..adapters.s3 import S3Adapter
from ..adapters.s3_transport import make_client
from ..core.l2_tier import L2Tier
from ..keys import ObjectKey
from . import bench_refs as refs

MIB = 1024 * 1024
MODEL = "bench/s3"


class S3BenchResult(msgspec.Struct):
    write_gbps: float
    read_gbps: float
    direct_write_gbps: float
    direct_read_gbps: float
    write_ratio: float
    read_ratio: float
    verified: bool
    chunk_bytes: int
    chunks: int
    rounds: int
    endpoint: str  # "local-moto" when the benchmark started its own server
    library: str


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "s3",
        help="S3 adapter put/get throughput vs raw boto3 against the same endpoint",
        description=(
            "Put and get CHUNKS objects of CHUNK_MIB MiB through the S3 adapter and, in the same "
            "run, through a bare boto3 client to the same bucket. Without --endpoint a moto S3 "
            "server is started in this process on 127.0.0.1."
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: an in-process moto server)")
    p.add_argument(
        "--bucket", default="trio-kv-bench", help="bucket, created if missing (default trio-kv-bench)"
    )
    p.add_argument("--region", default=None, help="region (default: the AWS configuration's, else us-east-1)")
    p.add_argument("--chunks", type=int, default=8, help="objects per round (default 8)")
    p.add_argument("--chunk-mib", type=float, default=32.0, help="object size in MiB (default 32)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; figures are totals over them (default 2)")


def main(args: argparse.Namespace) -> int:
    logging.getLogger("trio_kv").setLevel(logging.ERROR)
    chunk_bytes = max(1, int(args.chunk_mib * MIB))
    with _endpoint(args.endpoint) as (endpoint_url, label):
        result = trio.run(
            _run, endpoint_url, label, args.bucket, args.region, args.chunks, chunk_bytes, args.rounds
        )
    if args.json:
        print(msgspec.json.encode(result).decode())
    else:
        for name in result.__struct_fields__:
            print(f"{name:20} {getattr(result, name)}")
    return 0 if result.verified else 1


@contextmanager
def _endpoint(endpoint_url: str | None) -> Iterator[tuple[str, str]]:
    """The endpoint to use and its label; without one, a moto server started here."""
    if endpoint_url is not None:
        yield endpoint_url, endpoint_url
        return
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise SystemExit("bench s3: pass --endpoint, or install moto[server] for a local server") from None
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with _fake_credentials_if_missing():
            yield f"http://{host}:{port}", "local-moto"
    finally:
        server.stop()


@contextmanager
def _fake_credentials_if_missing() -> Iterator[None]:
    fake = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    added = {name: value for name, value in fake.items() if name not in os.environ}
    if "AWS_ACCESS_KEY_ID" in os.environ:
        added = {}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


async def _run(
    endpoint_url: str, label: str, bucket: str, region: str | None, chunks: int, chunk_bytes: int, rounds: int
) -> S3BenchResult:
    client = make_client(endpoint_url, region, connect_timeout_s=10.0, read_timeout_s=60.0, pool=4)
    await trio.to_thread.run_sync(_ensure_bucket, client, bucket)
    adapter = S3Adapter(
        bucket, prefix=f"bench-{uuid.uuid4().hex[:12]}/", endpoint_url=endpoint_url, region=region
    )
    l2 = L2Tier(adapter)  # as the server calls it: the ledger is part of what a put costs
    source = torch.randint(0, 256, (chunks * chunk_bytes,), dtype=torch.uint8)
    target = torch.zeros_like(source)
    source_view, target_view = source.numpy().data, target.numpy().data  # like L1's arena
    slices = [slice(i * chunk_bytes, (i + 1) * chunk_bytes) for i in range(chunks)]
    blobs = [bytes(source_view[part]) for part in slices]
    totals = {"write": 0.0, "read": 0.0, "direct_write": 0.0, "direct_read": 0.0}
    verified = True
    # Round -1 is an untimed warm-up: connections, credentials, and the server's first allocations.
    for round_index in range(-1, rounds):
        refs.progress(
            f"bench s3: {label}, " + (f"round {round_index + 1}/{rounds}" if round_index >= 0 else "warm-up")
        )
        keys = [ObjectKey(MODEL, 1, 0, uuid.uuid4().bytes, "") for _ in range(chunks)]
        names = [f"{adapter.prefix}direct/{uuid.uuid4().hex}" for _ in range(chunks)]
        adapter_first = round_index % 2 == 0
        for side in ("adapter", "direct") if adapter_first else ("direct", "adapter"):
            # Each side deletes its objects before the other starts: both find the server alike.
            if side == "adapter":
                write_s, read_s = await _adapter_round(l2, keys, source_view, target_view, slices)
                verified &= bool(torch.equal(source, target))
                target.zero_()
                await l2.delete(keys)
            else:
                write_s, read_s, same = await trio.to_thread.run_sync(
                    _direct_round, client, bucket, names, blobs
                )
                verified &= same
                await trio.to_thread.run_sync(_delete_all, client, bucket, names)
            if round_index >= 0:
                prefix = "" if side == "adapter" else "direct_"
                totals[f"{prefix}write"] += write_s
                totals[f"{prefix}read"] += read_s
    moved = rounds * chunks * chunk_bytes
    gbps = {name: moved / seconds / 1e9 for name, seconds in totals.items()}
    return S3BenchResult(
        write_gbps=gbps["write"],
        read_gbps=gbps["read"],
        direct_write_gbps=gbps["direct_write"],
        direct_read_gbps=gbps["direct_read"],
        write_ratio=gbps["write"] / gbps["direct_write"],
        read_ratio=gbps["read"] / gbps["direct_read"],
        verified=verified,
        chunk_bytes=chunk_bytes,
        chunks=chunks,
        rounds=rounds,
        endpoint=label,
        library=f"boto3 {_boto3_version()}",
    )


async def _adapter_round(
    l2: L2Tier[S3Adapter], keys: list[ObjectKey], source: memoryview, target: memoryview, slices: list[slice]
) -> tuple[float, float]:
    start = time.perf_counter()
    for index, key in enumerate(keys):
        if not await l2.put(key, source[slices[index]]):
            raise RuntimeError(f"bench s3: the adapter did not store chunk {index}")
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    for index, key in enumerate(keys):
        if not await l2.get_into(key, target[slices[index]]):
            raise RuntimeError(f"bench s3: the adapter did not find chunk {index}")
    return write_s, time.perf_counter() - start


def _direct_round(
    client: Any, bucket: str, names: list[str], blobs: list[bytes]
) -> tuple[float, float, bool]:
    """Put then get every blob with bare boto3 calls (blocking); returns seconds and whether
    every object came back equal."""
    start = time.perf_counter()
    for name, blob in zip(names, blobs):
        client.put_object(Bucket=bucket, Key=name, Body=blob)
    write_s = time.perf_counter() - start
    read_s = 0.0
    same = True
    for name, blob in zip(names, blobs):
        start = time.perf_counter()
        got = client.get_object(Bucket=bucket, Key=name)["Body"].read()
        read_s += time.perf_counter() - start
        same &= got == blob
    return write_s, read_s, same


def _ensure_bucket(client: Any, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
        return
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            raise
    region = client.meta.region_name
    extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    client.create_bucket(Bucket=bucket, **extra)


def _delete_all(client: Any, bucket: str, names: list[str]) -> None:
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": name} for name in names], "Quiet": True})


def _boto3_version() -> str:
    import boto3

    return str(boto3.__version__)
