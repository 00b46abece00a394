"""A fault-injection soak: many clients, random requests, adapters that fail and stall, clients
killed mid-request, engines that truncate their plain KV file under the server. At the end every lease must be released, every ledger must equal a recount
of what is stored, no task may be left behind and no retrieved byte may differ.

Used by ``trio-kv bench soak`` (as long as asked) and by the test suite (about 30 seconds).
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import msgspec
import torch
import trio

from ..adapters.mock import MockAdapter
from ..client import AsyncClient
from ..core.l2_tier import L2Tier
from ..errors import ErrorCode, TrioKVError
from ..export.shm import SharedKVCache, create_shared_kv_cache
from ..keys import RequestKey
from ..testing import running_server
from .bombs import BombCounts, bomb_loop

CHUNK = 32
BLOCK = 16
BLOCKS_PER_CLIENT = 32
SALTS = ("", "tenant-a", "tenant-b")
PROMPTS_PER_SALT = 12
TRUNCATOR_PROMPTS = 8
# Every chunk the soak can store: each salt's prompts (up to 4 chunks each) and the truncator's.
DISTINCT_CHUNKS = len(SALTS) * PROMPTS_PER_SALT * 4 + TRUNCATOR_PROMPTS * 4
PROGRESS_EVERY_S = 10.0  # how often run_soak's progress callback gets a line
BOMB_BYTES = 1 << 20  # decode bombs a hostile client sends alongside (tools/bombs.py)


class SoakReport(msgspec.Struct):
    seconds: float
    clients: int
    requests: int
    errors: int
    faults_injected: int
    clients_killed: int
    requests_abandoned: int
    leaked_leases: int
    leaked_bytes: int
    ledger_problems: list[str]
    l2_ledger_mismatches: int
    leaked_tasks: int
    data_mismatches: int
    chunks_verified: int
    l1_evictions: int
    l2_loads: int
    l2_writes: int
    l2_evictions: int
    l2_objects_held: int  # in the fullest L2 tier at the end; at most DISTINCT_CHUNKS
    rss_growth_after_warmup_mib: float
    truncations: int = 0  # plain KV files truncated under the server by their engine
    truncation_surprises: int = 0  # copies from or into a truncated file that did not fail
    bombs_sent: int = 0
    bomb_wrong_replies: int = 0  # bombs answered with anything but BAD_REQUEST / UNKNOWN_REQUEST


@dataclass
class _Counts:
    requests: int = 0
    errors: int = 0
    faults: int = 0
    killed: int = 0
    abandoned: int = 0
    mismatches: int = 0
    verified: int = 0
    truncations: int = 0
    truncation_surprises: int = 0
    rss_samples: list[float] = field(default_factory=list)


def _prompt(salt: str, index: int) -> list[int]:
    """Prompt ``index`` of a salt's pool; prompts share prefixes with their neighbours."""
    rng = random.Random(f"{salt}/{index // 3}")
    shared = [rng.randrange(50_000) for _ in range(CHUNK)]
    rng = random.Random(f"{salt}/{index}")
    return shared + [rng.randrange(50_000) for _ in range(rng.randrange(1, 4) * CHUNK)]


def _fill(kv: SharedKVCache, blocks: list[int], salt: str, tokens: list[int]) -> None:
    """Write the KV a forward pass would: a pure function of (salt, prefix, block position)."""
    for position, block in enumerate(blocks):
        prefix_end = (position // (CHUNK // BLOCK) + 1) * CHUNK
        digest = hashlib.blake2b(repr((salt, tokens[:prefix_end], position)).encode(), digest_size=8)
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little"))
        for tensor, spec in zip(kv.tensors, kv.specs):
            view = tensor.select(spec.block_dim, block)
            view.copy_(torch.randn(view.shape, generator=generator).to(view.dtype))


def _rss_mib() -> float:
    """Resident memory now (not the peak)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _count_tasks() -> int:
    """Every live Trio task under the root."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def _client_loop(
    index: int, url: str, kv: SharedKVCache, deadline: float, counts: _Counts, seed: int
) -> None:
    rng = random.Random(seed * 1000 + index)
    own = list(range(index * BLOCKS_PER_CLIENT, (index + 1) * BLOCKS_PER_CLIENT))
    instance = f"worker-{index}"
    while trio.current_time() < deadline:
        client = await AsyncClient.connect(url, timeout_s=10)
        try:
            await client.register_kv_cache(instance, kv)
            # Each connection lives for a random number of requests, then is killed mid-request.
            for _ in range(rng.randrange(5, 40)):
                if trio.current_time() >= deadline:
                    break
                await _one_request(client, instance, kv, own, rng, counts)
            counts.killed += 1
            with trio.move_on_after(rng.random() * 0.005):
                salt = rng.choice(SALTS)
                await client.lookup(
                    RequestKey("m", 1, None, _prompt(salt, 0), request_id=f"killed-{index}", cache_salt=salt)
                )
        finally:
            client.close()


async def _one_request(
    client: AsyncClient, instance: str, kv: SharedKVCache, own: list[int], rng: random.Random, counts: _Counts
) -> None:
    salt = rng.choice(SALTS)
    tokens = _prompt(salt, rng.randrange(PROMPTS_PER_SALT))
    request_id = f"{instance}-{rng.randrange(4)}"
    n_blocks = len(tokens) // BLOCK
    half = len(own) // 2
    op = rng.choices(["store", "lookup", "retrieve", "release", "end", "abort"], [4, 4, 4, 1, 1, 1])[0]
    counts.requests += 1
    try:
        if op == "store":
            blocks = own[:n_blocks]
            _fill(kv, blocks, salt, tokens)
            await client.store(
                instance, RequestKey("m", 1, 0, tokens, request_id=request_id, cache_salt=salt), blocks
            )
        elif op == "lookup":
            await client.lookup(RequestKey("m", 1, None, tokens, request_id=request_id, cache_salt=salt))
        elif op == "retrieve":
            blocks = own[half : half + n_blocks]
            got = await client.retrieve(
                instance, RequestKey("m", 1, 0, tokens, request_id=request_id, cache_salt=salt), blocks
            )
            _verify(kv, blocks, salt, tokens, got.hit_tokens, counts)
        elif op == "release":
            await client.release(request_id, salt)
        elif op == "end":
            await client.end_session(request_id, salt)
        else:
            counts.abandoned += 1
            with trio.move_on_after(rng.random() * 0.002):
                await client.lookup(RequestKey("m", 1, None, tokens, request_id=request_id, cache_salt=salt))
    except TrioKVError:
        counts.errors += 1


def _verify(
    kv: SharedKVCache, blocks: list[int], salt: str, tokens: list[int], hit_tokens: int, counts: _Counts
) -> None:
    hit_blocks = hit_tokens // BLOCK
    if not hit_blocks:
        return
    expected = create_expected(kv, salt, tokens, hit_blocks)
    for position in range(hit_blocks):
        counts.verified += 1
        if kv.block_bytes(blocks[position]) != expected[position]:
            counts.mismatches += 1


_scratch: dict[int, SharedKVCache] = {}


def create_expected(kv: SharedKVCache, salt: str, tokens: list[int], n_blocks: int) -> list[bytes]:
    """The bytes blocks 0..n_blocks-1 of (salt, tokens) must hold, computed in a scratch cache."""
    scratch = _scratch.get(id(kv))
    if scratch is None:
        scratch = _scratch[id(kv)] = create_shared_kv_cache(
            num_blocks=BLOCKS_PER_CLIENT,
            block_size=BLOCK,
            num_layers=2,
            num_kv_heads=2,
            head_size=32,
            fill="zeros",
        )
    blocks = list(range(n_blocks))
    _fill(scratch, blocks, salt, tokens)
    return [scratch.block_bytes(b) for b in blocks]


async def _truncation_loop(url: str, deadline: float, counts: _Counts, seed: int) -> None:
    """An engine that registers a plain (unsealed) KV file, stores, truncates the file to 0
    and stores and retrieves again: both must fail with TRANSFER_FAILED and the server live."""
    rng = random.Random(seed * 7919)
    blocks = list(range(4 * CHUNK // BLOCK))
    # What it stores comes from a few prompts: each new one would stay in the unbounded first
    # L2 tier for good, and the resident memory the soak reports would grow with the run's length.
    prompts = [[rng.randrange(50_000) for _ in range(4 * CHUNK)] for _ in range(TRUNCATOR_PROMPTS)]
    async with await AsyncClient.connect(url, timeout_s=10) as client:
        while trio.current_time() < deadline:
            tokens = rng.choice(prompts)
            fresh = [rng.randrange(50_000) for _ in range(4 * CHUNK)]  # never stored: the file is empty
            with create_shared_kv_cache(
                num_blocks=len(blocks),
                block_size=BLOCK,
                num_layers=2,
                num_kv_heads=2,
                head_size=32,
                sealed=False,
            ) as kv:
                await client.register_kv_cache("truncator", kv)
                await client.store("truncator", RequestKey("m", 1, 0, tokens), blocks)
                os.truncate(kv.path, 0)
                counts.truncations += 1
                for attempt in ("store", "retrieve"):
                    try:
                        if attempt == "store":
                            moved = (
                                await client.store("truncator", RequestKey("m", 1, 0, fresh), blocks)
                            ).stored
                        else:
                            got = await client.retrieve("truncator", RequestKey("m", 1, 0, tokens), blocks)
                            moved = got.chunks_written
                    except TrioKVError as exc:
                        moved = 0 if exc.code == ErrorCode.TRANSFER_FAILED else -1
                    if moved:  # bytes moved from or into an empty file, or another error
                        counts.truncation_surprises += 1
                await client.unregister("truncator")
            await trio.sleep(rng.uniform(0.05, 0.2))


async def _chaos(adapters: list[MockAdapter], deadline: float, counts: _Counts, seed: int) -> None:
    """Adapters fail, stall and recover at random until the deadline, then recover for good."""
    rng = random.Random(seed)
    try:
        while trio.current_time() < deadline:
            adapter = rng.choice(adapters)
            fault = rng.choice(["down", "flaky", "stall"])
            counts.faults += 1
            if fault == "down":
                adapter.down = True
            elif fault == "flaky":
                adapter.fail_rate = 0.3
            else:
                adapter.stall(rng.choice(["get", "put", "contains"]))
            await trio.sleep(rng.uniform(0.05, 0.5))
            adapter.down = False
            adapter.fail_rate = 0.0
            adapter.unstall()
            await trio.sleep(rng.uniform(0.05, 0.5))
            counts.rss_samples.append(_rss_mib())
    finally:
        for adapter in adapters:
            adapter.down = False
            adapter.fail_rate = 0.0
            adapter.unstall()


def _l2_mismatches(l2_tiers: list[L2Tier[MockAdapter]]) -> int:
    """Tiers whose ledger differs from a recount of the objects their adapter holds."""
    bad = 0
    for l2 in l2_tiers:
        recount: dict[str, int] = {}
        for key, data in l2.adapter.objects.items():
            recount[key.cache_salt] = recount.get(key.cache_salt, 0) + len(data)
        if dict(l2.ledger.bytes_by_salt) != recount or l2.pinned():
            bad += 1
    return bad


async def _report_progress(
    progress: Callable[[str], None], start: float, deadline: float, counts: _Counts
) -> None:
    """A line every ``PROGRESS_EVERY_S`` until the deadline: how far the soak is, what it did."""
    while trio.current_time() + PROGRESS_EVERY_S < deadline:
        await trio.sleep(PROGRESS_EVERY_S)
        progress(
            f"bench soak: {trio.current_time() - start:.0f}/{deadline - start:.0f} s, {counts.requests} requests, "
            f"{counts.faults} faults, {counts.killed} clients killed, {counts.verified} chunks verified"
        )


async def run_soak(
    seconds: float,
    *,
    clients: int = 8,
    seed: int = 1,
    progress: Callable[[str], None] = lambda line: None,
) -> SoakReport:
    """Run the soak for ``seconds`` and audit everything afterwards; ``progress`` gets a line
    every ``PROGRESS_EVERY_S`` while it runs, and one as the audit starts."""
    counts = _Counts()
    bombs = BombCounts()
    lease_ttl = 1.0
    with create_shared_kv_cache(
        num_blocks=clients * BLOCKS_PER_CLIENT, block_size=BLOCK, num_layers=2, num_kv_heads=2, head_size=32
    ) as kv:
        async with running_server(
            chunk_size=CHUNK,
            l1_size="1MiB",  # small, so eviction and reloads from L2 happen all the time
            l2=["mock:first", "mock:second?capacity=1MiB"],
            lease_ttl_s=lease_ttl,
            l2_lookup_timeout_s=0.2,
            l2_load_timeout_s=0.3,
            l2_write_timeout_s=0.3,
            request_timeout_s=5,
        ) as server:
            l2_tiers = [t for t in server.server.l2_tiers if isinstance(t.adapter, MockAdapter)]
            adapters = [t.adapter for t in l2_tiers]
            tasks_before = _count_tasks()
            watches_before = len(server.engine.owners)
            start = trio.current_time()
            deadline = start + seconds
            counts.rss_samples.append(_rss_mib())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_chaos, adapters, deadline, counts, seed)
                nursery.start_soon(_truncation_loop, server.url, deadline, counts, seed)
                nursery.start_soon(
                    partial(bomb_loop, frame_bytes=BOMB_BYTES), server.url, deadline, bombs, seed
                )
                for index in range(clients):
                    nursery.start_soon(_client_loop, index, server.url, kv, deadline, counts, seed)
                nursery.start_soon(_report_progress, progress, start, deadline, counts)
            progress("bench soak: load over; waiting for the server to go idle, then auditing")
            # Quiesce: requests finish, write-behind drains, abandoned calls land, leases expire.
            with trio.fail_after(30):
                await server.server.wait_idle()
                await trio.sleep(lease_ttl + 0.5)
                await server.server.wait_idle()
            engine = server.engine
            problems = engine.audit()
            leaked_bytes = sum(
                engine.l1.size_of(e) for e in engine.l1.entries() if e.readers or e.state.value != "ready"
            )
            # Each live registration of a sealed memfd has one task watching its owner: not a leak.
            tasks_after = _count_tasks() - (len(engine.owners) - watches_before)
            counts.rss_samples.append(_rss_mib())
            warm = counts.rss_samples[len(counts.rss_samples) // 3]
            report = SoakReport(
                seconds=trio.current_time() - start,
                clients=clients,
                requests=counts.requests,
                errors=counts.errors,
                faults_injected=counts.faults,
                clients_killed=counts.killed,
                requests_abandoned=counts.abandoned,
                leaked_leases=len(engine.leases),
                leaked_bytes=leaked_bytes,
                ledger_problems=problems,
                l2_ledger_mismatches=_l2_mismatches(l2_tiers),
                leaked_tasks=max(0, tasks_after - tasks_before),
                data_mismatches=counts.mismatches,
                chunks_verified=counts.verified,
                l1_evictions=engine.l1.evictions,
                l2_loads=sum(t.loads for t in engine.status().l2),
                l2_writes=sum(t.written for t in engine.status().l2),
                l2_evictions=sum(t.evictions for t in l2_tiers),
                l2_objects_held=max(len(t.adapter.objects) for t in l2_tiers),
                rss_growth_after_warmup_mib=counts.rss_samples[-1] - warm,
                truncations=counts.truncations,
                truncation_surprises=counts.truncation_surprises,
                bombs_sent=bombs.sent,
                bomb_wrong_replies=bombs.wrong_replies,
            )
    for scratch in _scratch.values():
        scratch.close()
    _scratch.clear()
    return report
