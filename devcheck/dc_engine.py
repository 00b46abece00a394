"""Device-check engine side: a separate process that registers torch CUDA KV caches with a running
`trio-kv serve --transfer cuda` by CUDA IPC (as the vLLM worker does), and checks bytes, ordering
and speed. Subcommands: wait, e2e, expandable, dead, killed, summarize-bench.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

BS, HEADS, HEAD, LAYERS = 16, 8, 128, 32  # Llama-3-8B-like: 32 KiB per (layer, K|V, block) in bf16
CHUNK = 256  # server default chunk size (tokens)
BLOCKS_PER_CHUNK = CHUNK // BS
DEVICE = os.environ.get("DC_DEVICE", "cuda")  # "cpu" only for a dry run of the KV class off-GPU


def log(*a: object) -> None:
    print("[engine]", *a, flush=True)


def connect(url: str, timeout_s: float = 60):
    from trio_kv.client import BlockingClient

    return BlockingClient.connect(url, timeout_s=timeout_s)


# ------------------------------------------------------------------ wait


def cmd_wait(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + 85
    last = None
    while time.monotonic() < deadline:
        if args.pid and not _alive(args.pid):
            log("server process exited")
            return 1
        try:
            with connect(args.url, timeout_s=2) as c:
                c.ping()
                st = c.status()
                log(f"server up: chunk_size={st.chunk_size} l1={st.l1}")
                return 0
        except Exception as exc:
            last = exc
            time.sleep(0.5)
    log("server not answering:", last)
    return 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------ KV caches like vLLM's


class KV:
    """A vLLM-shaped KV cache on cuda:0 in one of three layouts.

    per_layer:   one allocation per layer, (2, NB, BS, H, D) contiguous (FlashAttention's shape)
    shared_perm: ONE int8 allocation carved into per-layer views at non-zero offsets, each view
                 (2, NB, BS, H, D) with NB-major strides (physical (NB, 2, BS, H, D)), as vLLM's
                 stride-order permutation produces: tests offset application and strided pieces
    cross_layer: one tensor (NB, L, 2, BS, H, D): one piece per block
    """

    def __init__(self, layout: str, num_blocks: int, layers: int = LAYERS) -> None:
        import torch

        self.layout, self.nb, self.layers = layout, num_blocks, layers
        dt = torch.bfloat16
        self.keep = []
        if layout == "per_layer":
            self.tensors = [
                torch.empty(2, num_blocks, BS, HEADS, HEAD, dtype=dt, device=DEVICE) for _ in range(layers)
            ]
            self.block_dim = 1
        elif layout == "shared_perm":
            per = num_blocks * 2 * BS * HEADS * HEAD * 2
            pad = 4096
            raw = torch.empty(pad + layers * (per + pad), dtype=torch.int8, device=DEVICE)
            self.keep.append(raw)
            self.tensors = []
            for i in range(layers):
                start = pad + i * (per + pad)
                phys = raw[start : start + per].view(dt).view(num_blocks, 2, BS, HEADS, HEAD)
                self.tensors.append(phys.permute(1, 0, 2, 3, 4))  # shape (2, NB, ...), NB-major strides
            self.block_dim = 1
        elif layout == "cross_layer":
            self.tensors = [torch.empty(num_blocks, layers, 2, BS, HEADS, HEAD, dtype=dt, device=DEVICE)]
            self.block_dim = 0
        else:
            raise ValueError(layout)
        self.randomize()

    def randomize(self) -> None:
        import torch

        g = torch.Generator(device=DEVICE)
        g.manual_seed(1234)
        for t in self.keep or self.tensors:
            u = t.view(torch.uint8) if t.is_contiguous() else None
            if u is None:
                raise AssertionError("non-contiguous tensor without a raw buffer")
            u.copy_(torch.randint(0, 256, u.shape, dtype=torch.uint8, device=DEVICE, generator=g))
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    def block(self, b: int):
        """Every byte of block b, as uint8 (a copy)."""
        import torch

        return torch.cat(
            [t.select(self.block_dim, b).contiguous().view(torch.uint8).flatten() for t in self.tensors]
        )

    def fill_blocks(self, blocks, value: float) -> None:
        for b in blocks:
            for t in self.tensors:
                t.select(self.block_dim, b).fill_(value)

    def kv_caches(self) -> dict:
        return (
            {f"model.layers.{i}.self_attn": t for i, t in enumerate(self.tensors)}
            if self.layout != "cross_layer"
            else {"all": self.tensors[0]}
        )

    @property
    def block_bytes(self) -> int:
        return 2 * self.layers * BS * HEADS * HEAD * 2

    def nbytes(self) -> int:
        return self.nb * self.block_bytes


def export(kv: KV):
    """What TrioKVConnector.register_kv_caches does for CUDA tensors."""
    from trio_kv.vllm.registration import cuda_kv_cache_export

    return cuda_kv_cache_export(kv.kv_caches(), block_size=BS, num_blocks=kv.nb)


def key(tokens, request_id=""):
    from trio_kv.keys import RequestKey

    return RequestKey(model="dc-model", world_size=1, rank=0, tokens=tokens, request_id=request_id)


def tokens_for(seed: int, n: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(1, 120000) for _ in range(n)]


# ------------------------------------------------------------------ e2e


class Checks:
    def __init__(self) -> None:
        self.results: dict = {"checks": {}, "timings": {}}
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.results["checks"][name] = "ok" if ok else f"FAIL {detail}"
        if not ok:
            self.failed += 1
        log(("PASS " if ok else "FAIL ") + name + (f" ({detail})" if detail and not ok else ""))


def correctness(client, kv: KV, ex, inst: str, c: Checks) -> None:
    import torch

    tag = kv.layout
    rng = random.Random(99)
    order = list(range(kv.nb))
    rng.shuffle(order)
    n_chunks = 2
    nblk = n_chunks * BLOCKS_PER_CHUNK
    src, dst, skp, src2, dst2, dst3 = (order[i * nblk : (i + 1) * nblk] for i in range(6))
    toks = tokens_for(zlib.crc32(tag.encode()) & 0xFFFF, n_chunks * CHUNK)
    truth = {b: kv.block(b) for b in src}
    torch.cuda.synchronize()

    r = client.store(inst, key(toks), src, ipc_event=ex.record_event())
    c.check(f"{tag}: store stored {n_chunks} chunks", r.stored == n_chunks, str(r))
    got = client.retrieve(inst, key(toks), dst, ipc_event=ex.record_event())
    c.check(f"{tag}: retrieve hit all tokens", got.hit_tokens == len(toks), str(got))
    torch.cuda.synchronize()
    bad = [i for i, (s, d) in enumerate(zip(src, dst)) if not torch.equal(kv.block(d), truth[s])]
    c.check(
        f"{tag}: retrieved blocks == stored blocks (byte-exact, {nblk} blocks)",
        not bad,
        f"blocks differ at {bad[:5]}",
    )
    c.check(f"{tag}: sources untouched by store", all(torch.equal(kv.block(s), truth[s]) for s in src))

    # skip_first_n_tokens: the first 3 blocks stay as they were
    skip = 3 * BS
    before = {b: kv.block(b) for b in skp[:3]}
    client.retrieve(inst, key(toks), skp, skip, ipc_event=ex.record_event())
    torch.cuda.synchronize()
    kept = all(torch.equal(kv.block(b), before[b]) for b in skp[:3])
    filled = all(torch.equal(kv.block(d), truth[s]) for s, d in zip(src[3:], skp[3:]))
    c.check(
        f"{tag}: skip_first_n_tokens={skip} leaves 3 blocks, fills the rest",
        kept and filled,
        f"kept={kept} filled={filled}",
    )

    # Store ordering: the engine writes src2 only after ~0.2 s of GPU work on a side stream; the Store
    # goes out at once with the event recorded after the writes. A server that does not wait stores stale bytes.
    toks2 = tokens_for(7 + (zlib.crc32(tag.encode()) & 0xFF), n_chunks * CHUNK)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(400_000_000)
        for i, b in enumerate(src2):
            for t in kv.tensors:
                t.select(kv.block_dim, b).fill_(float(i % 7 + 1))
    ev = ex.record_event(side)
    t0 = time.perf_counter()
    r = client.store(inst, key(toks2), src2, ipc_event=ev)
    waited = time.perf_counter() - t0
    torch.cuda.synchronize()
    client.retrieve(inst, key(toks2), dst2, ipc_event=ex.record_event())
    torch.cuda.synchronize()
    ok = all(bool((kv.block(d) == kv.block(s)).all()) for s, d in zip(src2, dst2))
    c.check(
        f"{tag}: store waits for the engine's IPC event (store took {waited:.3f}s)",
        ok and r.stored == n_chunks,
        f"stored={r}",
    )

    # Retrieve ordering: the engine's pending write to dst3 (after a GPU sleep) must land before the
    # server's copy, so after the reply + sync the blocks hold the retrieved data, not the engine's fill.
    torch.cuda._sleep(400_000_000)
    kv.fill_blocks(dst3, 3.0)
    client.retrieve(inst, key(toks), dst3, ipc_event=ex.record_event())
    torch.cuda.synchronize()
    ok = all(torch.equal(kv.block(d), truth[s]) for s, d in zip(src, dst3))
    c.check(f"{tag}: retrieve waits for the engine's IPC event", ok)


def throughput(client, kv: KV, ex, inst: str, c: Checks, rounds: int, requests: int, chunks_per: int) -> None:
    import torch

    tag = kv.layout
    nblk = chunks_per * BLOCKS_PER_CHUNK
    rng = random.Random(5)
    order = list(range(kv.nb))
    rng.shuffle(order)
    need = 2 * requests * nblk
    if need > kv.nb:
        raise SystemExit(f"num_blocks {kv.nb} < {need}")
    srcs = [order[i * nblk : (i + 1) * nblk] for i in range(requests)]
    dsts = [order[(requests + i) * nblk : (requests + i + 1) * nblk] for i in range(requests)]
    total = requests * chunks_per * CHUNK // BS * kv.block_bytes
    pool = ThreadPoolExecutor(requests)
    store_s, retr_s = [], []
    for rnd in range(rounds):
        client.clear("")  # the keys' salt; a Clear of every salt needs the admin token
        toks = [
            tokens_for(1000 * rnd + i + (zlib.crc32(tag.encode()) & 0xFFF) * 7, chunks_per * CHUNK)
            for i in range(requests)
        ]
        torch.cuda.synchronize()
        ev = ex.record_event()
        t0 = time.perf_counter()
        res = list(
            pool.map(
                lambda i, toks=toks, ev=ev: client.store(inst, key(toks[i]), srcs[i], ipc_event=ev),
                range(requests),
            )
        )
        store_s.append(time.perf_counter() - t0)
        stored = sum(r.stored for r in res)
        if stored != requests * chunks_per:
            c.check(f"{tag}: throughput round {rnd} stored all chunks", False, f"stored {stored}: {res[0]}")
        ev = ex.record_event()
        t0 = time.perf_counter()
        got = list(
            pool.map(
                lambda i, toks=toks, ev=ev: client.retrieve(inst, key(toks[i]), dsts[i], ipc_event=ev),
                range(requests),
            )
        )
        retr_s.append(time.perf_counter() - t0)
        if sum(g.chunks_written for g in got) != requests * chunks_per:
            c.check(f"{tag}: throughput round {rnd} retrieved all chunks", False, str(got[0]))
    torch.cuda.synchronize()
    sample = srcs[0][:4] + srcs[-1][-4:]
    sample_d = dsts[0][:4] + dsts[-1][-4:]
    c.check(
        f"{tag}: throughput data intact (sampled)",
        all(torch.equal(kv.block(s), kv.block(d)) for s, d in zip(sample, sample_d)),
    )
    pool.shutdown()

    # Raw reference in the same process: one pinned torch copy of the same bytes each way.
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    d2h, h2d = [], []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        d2h.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        h2d.append(time.perf_counter() - t0)
    del dev, host
    gb = total / 1e9
    t = {
        "bytes_per_round": total,
        "requests": requests,
        "chunks_per_request": chunks_per,
        "store_gbps": [round(gb / s, 2) for s in store_s],
        "retrieve_gbps": [round(gb / s, 2) for s in retr_s],
        "pinned_d2h_gbps": [round(gb / s, 2) for s in d2h],
        "pinned_h2d_gbps": [round(gb / s, 2) for s in h2d],
    }
    t["store_ratio_best"] = round(max(t["store_gbps"]) / max(t["pinned_d2h_gbps"]), 3)
    t["retrieve_ratio_best"] = round(max(t["retrieve_gbps"]) / max(t["pinned_h2d_gbps"]), 3)
    c.results["timings"][tag] = t
    log(f"{tag}: {json.dumps(t)}")


def cmd_e2e(args: argparse.Namespace) -> int:
    import torch

    c = Checks()
    t_start = time.perf_counter()
    with connect(args.url, timeout_s=60) as client:
        for layout in ("per_layer", "shared_perm", "cross_layer"):
            big = layout != "shared_perm" and not args.quick
            requests, chunks_per = (8, 8) if big else (2, 2)
            nb = max(2 * requests * chunks_per * BLOCKS_PER_CHUNK + 64, 256)
            t0 = time.perf_counter()
            kv = KV(layout, nb)
            ex = export(kv)
            exp_s = time.perf_counter() - t0
            reg = ex.register_request(f"dc-{layout}")
            allocs = len(reg.cuda.allocations)
            offs = sorted({s.offset for s in reg.tensors})
            log(
                f"{layout}: {len(reg.tensors)} tensors in {allocs} allocations, offsets {offs[:3]}..., {kv.nbytes() / 2**30:.2f} GiB"
            )
            t0 = time.perf_counter()
            try:
                ok = client.register(reg)
            except Exception as exc:
                c.check(f"{layout}: register", False, repr(exc))
                continue
            reg_s = time.perf_counter() - t0
            c.results["timings"][f"{layout}_register_s"] = round(reg_s, 4)
            c.check(
                f"{layout}: register ({allocs} IPC handles in {reg_s * 1e3:.1f} ms; export {exp_s:.2f}s)",
                ok.num_blocks == nb and ok.block_bytes == kv.block_bytes,
                str(ok),
            )
            if layout == "shared_perm":
                c.check(
                    f"{layout}: offsets inside one allocation are non-zero",
                    allocs == 1 and offs[0] > 0,
                    f"allocs={allocs} offs={offs[:2]}",
                )
            try:
                correctness(client, kv, ex, f"dc-{layout}", c)
                if big:
                    throughput(client, kv, ex, f"dc-{layout}", c, args.rounds, requests, chunks_per)
            except Exception as exc:
                import traceback

                traceback.print_exc()
                c.check(f"{layout}: no exception", False, repr(exc)[:300])
            client.unregister(f"dc-{layout}")
            ex.close()
            del kv, ex
            torch.cuda.empty_cache()
        st = client.status()
        c.check(
            "server has no request in flight at the end",
            st.requests_in_flight <= 1,
            str(st.requests_in_flight),
        )
    c.results["seconds"] = round(time.perf_counter() - t_start, 1)
    c.results["failed"] = c.failed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(c.results, f, indent=1)
    log(f"e2e done: {c.failed} failed, {time.perf_counter() - t_start:.1f}s")
    return 1 if c.failed else 0


# ------------------------------------------------------------------ probes


def cmd_expandable(args: argparse.Namespace) -> int:
    """Export under expandable_segments (cuMem* VMM memory): what error does the user get?"""
    code = (  # noqa: UP031 (the child's source, with reprs put in)
        "import sys; sys.path[:0] = %r\n"
        "import torch\n"
        "from trio_kv.vllm.registration import cuda_kv_cache_export\n"
        "t = torch.empty(2, 64, 16, 8, 128, dtype=torch.bfloat16, device='cuda')\n"
        "try:\n"
        "    ex = cuda_kv_cache_export({'l0': t}, block_size=16, num_blocks=64)\n"
        "    print('EXPORTED (allocations', len(ex.registration.allocations), ')')\n"
        "    from trio_kv.client import BlockingClient\n"
        "    with BlockingClient.connect(%r, timeout_s=30) as c:\n"
        "        print('REGISTER ->', c.register(ex.register_request('dc-expandable')))\n"
        "        c.unregister('dc-expandable')\n"
        "except Exception as exc:\n"
        "    print('EXPORT/REGISTER FAILED:', type(exc).__name__, exc)\n"
    ) % (sys.path, args.url)
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=35)
    log("expandable_segments:True ->", (out.stdout + out.stderr).strip()[-800:])
    return 0


def _free_gib() -> float:
    import torch

    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def cmd_dead(args: argparse.Namespace) -> int:
    """An engine that registers and dies without unregistering: is its GPU memory kept by the server?
    Expected: no (the registration goes with its connection and its IPC mappings are closed), so
    the Unregister afterwards finds nothing (existed=False)."""
    import torch

    torch.cuda.init()
    _free_gib()
    code = (  # noqa: UP031 (the child's source, with reprs put in)
        "import sys, os; sys.path[:0] = %r\n"
        "import torch\n"
        "from trio_kv.vllm.registration import cuda_kv_cache_export\n"
        "t = torch.empty(2, 4096, 16, 8, 128 * 16, dtype=torch.bfloat16, device='cuda')\n"  # 4 GiB
        "ex = cuda_kv_cache_export({'l0': t}, block_size=16, num_blocks=4096)\n"
        "from trio_kv.client import BlockingClient\n"
        "c = BlockingClient.connect(%r, timeout_s=30)\n"
        "print('registered', c.register(ex.register_request('dc-dead')), flush=True)\n"
        "os._exit(0)\n"
    ) % (sys.path, args.url)
    before = _free_gib()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=40)
    log("dead engine:", (out.stdout + out.stderr).strip()[-300:])
    time.sleep(2)
    after_exit = _free_gib()
    with connect(args.url) as c:
        log("unregister:", c.unregister("dc-dead"))
    time.sleep(2)
    after_unreg = _free_gib()
    log(
        f"free GiB: before {before:.2f}, after the engine died {after_exit:.2f} "
        f"(held {before - after_exit:.2f}), after unregister {after_unreg:.2f} (held {before - after_unreg:.2f})"
    )
    print(
        f"RESULT dead-engine: GiB still held after engine exit = {before - after_exit:.2f} (expected ~0); "
        f"after unregister = {before - after_unreg:.2f}"
    )
    return 0


def cmd_killed(args: argparse.Namespace) -> int:
    """The engine is SIGKILLed while the server waits for its IPC event (GPU busy for ~5 s).
    Does the server answer, end that store, and keep serving? Its connection's drop retires the
    registration, which stops the wait: the store should end about as soon as nng reports the
    connection gone (expected < 2 s), at the latest at TRIO_KV_GPU_COPY_TIMEOUT_S=10, within the
    15 s watched here. Nothing of the victim's prompt may be kept (a lookup: 0 hits)."""
    code = (  # noqa: UP031 (the child's source, with reprs put in)
        "import sys, os, threading, time; sys.path[:0] = %r\n"
        "import torch\n"
        "from trio_kv.vllm.registration import cuda_kv_cache_export\n"
        "from trio_kv.keys import RequestKey\n"
        "t = torch.zeros(2, 64, 16, 8, 128, dtype=torch.bfloat16, device='cuda')\n"
        "ex = cuda_kv_cache_export({'l0': t}, block_size=16, num_blocks=64)\n"
        "from trio_kv.client import BlockingClient\n"
        "c = BlockingClient.connect(%r, timeout_s=60)\n"
        "c.register(ex.register_request('dc-victim'))\n"
        "torch.cuda._sleep(10_000_000_000)\n"  # ~5 s of GPU spin before the event
        "ev = ex.record_event()\n"
        "k = RequestKey(model='dc-model', world_size=1, rank=0, tokens=list(range(256)))\n"
        "threading.Thread(target=lambda: c.store('dc-victim', k, list(range(16)), ipc_event=ev), daemon=True).start()\n"
        "print('store sent', flush=True)\n"
        "time.sleep(60)\n"
    ) % (sys.path, args.url)
    with connect(args.url, timeout_s=10) as c:
        baseline = c.status().requests_in_flight  # this status request itself
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 40:
        line = child.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if "store sent" in line:
            break
    if not lines or "store sent" not in lines[-1]:
        child.kill()
        child.wait()
        print("RESULT killed-engine: NOT RUN, the victim did not send its store:", " | ".join(lines)[-600:])
        return 1
    time.sleep(1.0)
    with connect(args.url, timeout_s=10) as c:
        before_kill = c.status().requests_in_flight
    log(f"in flight before the kill: {before_kill} (baseline {baseline})")
    child.send_signal(signal.SIGKILL)
    child.wait()
    t_kill = time.monotonic()
    log("victim killed")
    if before_kill <= baseline:
        print(
            "RESULT killed-engine: INCONCLUSIVE, the victim's store was not in flight when it was killed "
            "(the server did not wait ~5 s for its event?)"
        )
        return 1
    finished_after = None
    with connect(args.url, timeout_s=10) as c:
        while time.monotonic() - t_kill < 15:
            c.ping()
            if c.status().requests_in_flight <= baseline:
                finished_after = time.monotonic() - t_kill
                break
            time.sleep(0.25)
        log("server answers after the kill; requests in flight:", c.status().requests_in_flight)
        from trio_kv.keys import RequestKey

        victim_key = RequestKey(model="dc-model", world_size=1, rank=0, tokens=list(range(256)))
        try:
            kept = c.lookup(victim_key).hit_tokens
            print(f"RESULT killed-engine: the victim's prompt has {kept} cached tokens (expected 0)")
        except Exception as exc:
            print("RESULT killed-engine: lookup of the victim's prompt failed:", exc)
        try:
            log("unregister victim:", c.unregister("dc-victim"))
        except Exception as exc:
            log("unregister victim failed:", exc)
    if finished_after is None:
        print(
            "RESULT killed-engine: the victim's store was STILL in flight 15 s after the kill "
            "(the wait for the dead engine's event is not bounded by gpu_copy_timeout_s?)"
        )
    else:
        print(f"RESULT killed-engine: the victim's store ended {finished_after:.2f} s after the kill")
    return 0


def cmd_summarize_bench(args: argparse.Namespace) -> int:
    try:
        with open(args.file) as f:
            text = f.read()
        start = text.index("{")
        data = json.loads(text[start : text.rindex("}") + 1])
    except Exception as exc:
        print(f"bench-gpu summary: no JSON ({exc})")
        return 1
    for r in data.get("layouts", []):
        print(
            f"bench-gpu {r['layout']}: store {r['store_gbps']:.1f} GB/s ({r['store_ratio']:.2f}x d2h {r['memcpy_d2h_gbps']:.1f}), "
            f"retrieve {r['retrieve_gbps']:.1f} GB/s ({r['retrieve_ratio']:.2f}x h2d {r['memcpy_h2d_gbps']:.1f}), "
            f"{r['pieces_per_round']} pieces, verified={r['verified']}"
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--url", required=True)
    w.add_argument("--pid", type=int, default=0)
    e = sub.add_parser("e2e")
    e.add_argument("--url", required=True)
    e.add_argument("--json", default="")
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--quick", action="store_true", help="small caches, no throughput")
    for name in ("expandable", "dead", "killed"):
        sub.add_parser(name).add_argument("--url", required=True)
    s = sub.add_parser("summarize-bench")
    s.add_argument("file")
    args = p.parse_args()
    if args.cmd in ("e2e", "expandable", "dead", "killed"):
        import torch

        if not torch.cuda.is_available():
            print(f"RESULT {args.cmd}: NOT RUN, torch {torch.__version__} has no usable CUDA device")
            return 4
    return {
        "wait": cmd_wait,
        "e2e": cmd_e2e,
        "expandable": cmd_expandable,
        "dead": cmd_dead,
        "killed": cmd_killed,
        "summarize-bench": cmd_summarize_bench,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
