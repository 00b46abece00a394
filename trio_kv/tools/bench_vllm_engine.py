"""One vLLM engine run of ``trio-kv bench vllm``, in its own process: ``python -m trio_kv.tools.bench_vllm_engine``.

Reads a ``RunSpec`` (JSON) on stdin, runs its steps in order on one in-process
vLLM engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the connector lives in
this process too), and writes one ``RunResult`` (JSON) to ``result_path``.
Progress goes to stderr. Steps generate a prompt greedily, optionally with
every load corrupted (``BenchConnector``, the negative control), or kill and
restart the trio-kv server this run owns.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import msgspec

from ..vllm.connection import REDIAL_MAX_MS

CONNECTOR = "BenchConnector"
MODULE = "trio_kv.tools.bench_vllm_engine"


class Step(msgspec.Struct, frozen=True):
    kind: str  # "generate", "burst", "kill_server" or "restart_server"
    prompt: int = -1  # index into RunSpec.prompts
    corrupt_loads: bool = False
    burst: list[int] = []  # "burst": these prompts, submitted together in one generate call


class RunSpec(msgspec.Struct, frozen=True):
    model: str
    prompts: list[list[int]]
    steps: list[Step]
    block_size: int = 32
    max_tokens: int = 16
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    dtype: str = "float32"  # bf16 rounding makes near-tie logits of a random model flip between runs
    url: str = ""  # "" runs without trio-kv
    timeout_s: float = 5.0
    server_cmd: list[str] = []  # how to start the trio-kv server this run owns (and restarts)
    result_path: str = ""  # where the RunResult goes (vLLM prints its own logs on stdout)


class Generated(msgspec.Struct, frozen=True):
    step: int
    prompt: int
    tokens: list[int]
    ttft_s: float
    cached_tokens: int
    corrupt_loads: bool
    seconds: float


class RunResult(msgspec.Struct):
    generated: list[Generated] = []
    connector_stats: dict[str, int] = {}
    corrupted_blocks: int = 0
    kv_cache_mode: str = ""  # "shared": vLLM's own KV allocation is registered; "staging": a mirror


def progress(message: str) -> None:
    print(f"[bench vllm] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the corrupting connector

_corrupt_loads = False
_corrupted_blocks = 0


def _make_connector_class() -> type:
    """``TrioKVConnector`` that, while ``_corrupt_loads`` is set, overwrites each loaded block with noise."""
    import torch

    from ..vllm.connector import TrioKVConnector
    from ..vllm.registration import block_dim, distinct_tensors

    class BenchConnector(TrioKVConnector):
        def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
            super().register_kv_caches(kv_caches)
            tensors = distinct_tensors(kv_caches.values())
            layout = [(t, block_dim(t.shape, self._num_blocks)) for t in tensors]
            worker = self._worker_logic()
            retrieve = worker._retrieve

            def corrupting_retrieve(plan: Any, event: bytes, client: Any) -> None:
                global _corrupted_blocks
                retrieve(plan, event, client)
                if not _corrupt_loads:
                    return
                first = plan.skip_tokens // worker.block_size
                loaded = plan.block_ids[first : len(plan.tokens) // 4 // worker.block_size]
                if loaded:
                    index = torch.tensor(loaded, dtype=torch.long)
                    for tensor, dim in layout:
                        noise = torch.randn(tensor.index_select(dim, index).shape).to(tensor.dtype)
                        tensor.index_copy_(dim, index, noise)
                    _corrupted_blocks += len(loaded)

            worker._retrieve = corrupting_retrieve  # type: ignore[method-assign]

    return BenchConnector


def __getattr__(name: str) -> Any:
    # vLLM loads the connector class by name from this module (kv_connector_module_path).
    if name == CONNECTOR:
        cls = _make_connector_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


# ---------------------------------------------------------------- the run


def _engine(spec: RunSpec) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if spec.url:
        kwargs["kv_transfer_config"] = {
            "kv_connector": CONNECTOR,
            "kv_connector_module_path": MODULE,
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {
                "trio_kv.url": spec.url,
                "trio_kv.timeout_s": spec.timeout_s,
                "trio_kv.connect_timeout_s": 30.0,
            },
        }
    return LLM(
        model=spec.model,
        tokenizer=spec.model,
        dtype=spec.dtype,
        max_model_len=spec.max_model_len,
        block_size=spec.block_size,
        enable_prefix_caching=False,
        enforce_eager=True,
        seed=0,
        disable_log_stats=False,
        **kwargs,
    )


def run(spec: RunSpec) -> RunResult:
    global _corrupt_loads
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    result = RunResult()
    server = _start_server(spec) if spec.server_cmd else None
    try:
        started = time.monotonic()
        llm = _engine(spec)
        label = "with" if spec.url else "without"
        progress(f"engine up in {time.monotonic() - started:.1f} s ({label} trio-kv)")
        sampling = SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, ignore_eos=True)
        for index, step in enumerate(spec.steps):
            if step.kind == "kill_server":
                if server is not None:
                    server.kill()
                    server.wait()
                    server = None
                progress("killed the trio-kv server (SIGKILL)")
                continue
            if step.kind == "restart_server":
                server = _start_server(spec)
                # The connector redials at most REDIAL_MAX_MS apart: give it that, and no more,
                # before the next request, so what follows measures a reconnected connector.
                time.sleep(2 * REDIAL_MAX_MS / 1000)
                progress("restarted the trio-kv server")
                continue
            _corrupt_loads = step.corrupt_loads
            result.generated += _generate(llm, spec, index, step, sampling, TokensPrompt)
        _corrupt_loads = False
        result.corrupted_blocks = _corrupted_blocks
        result.connector_stats, result.kv_cache_mode = _connector_facts()
        _shutdown(llm)  # before the server goes: the connector unregisters on the way out
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    return result


def _generate(
    llm: Any, spec: RunSpec, index: int, step: Step, sampling: Any, prompt_type: Any
) -> list[Generated]:
    """One prompt, or a burst of them in one ``generate`` call (vLLM sees them all at once)."""
    begun = time.monotonic()
    indices = step.burst if step.kind == "burst" else [step.prompt]
    prompts = [prompt_type(prompt_token_ids=spec.prompts[i]) for i in indices]
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    seconds = time.monotonic() - begun
    generated = []
    for prompt, output in zip(indices, outputs):
        ttft = getattr(output.metrics, "first_token_latency", 0.0) or seconds
        cached = output.num_cached_tokens or 0
        progress(
            f"step {index}: prompt {prompt} ({len(spec.prompts[prompt])} tokens), {cached} from trio-kv, "
            f"ttft {ttft * 1000:.0f} ms" + (" [loads corrupted]" if step.corrupt_loads else "")
        )
        tokens = list(output.outputs[0].token_ids)
        generated.append(Generated(index, prompt, tokens, ttft, cached, step.corrupt_loads, seconds))
    return generated


def _connector_facts() -> tuple[dict[str, int], str]:
    """The worker connector's counters and KV cache mode (this process holds the engine core)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    worker = getattr(get_kv_transfer_group(), "_worker", None) if has_kv_transfer_group() else None
    if worker is None:
        return {}, ""
    return msgspec.structs.asdict(worker.stats), "staging" if worker.staging is not None else "shared"


def _shutdown(llm: Any) -> None:
    """Shut the engine core down (vLLM 0.32: ``llm.llm_engine.engine_core.shutdown``)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        shutdown()


def _start_server(spec: RunSpec) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(spec.server_cmd, stdin=subprocess.DEVNULL)
    try:
        _wait_for_socket(spec.url)
    except BaseException:
        server.kill()
        server.wait()
        raise
    return server


def _wait_for_socket(url: str, timeout_s: float = 30.0) -> None:
    from ..client import BlockingClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with BlockingClient.connect(url, timeout_s=2.0):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> int:
    spec = msgspec.json.decode(sys.stdin.buffer.read(), type=RunSpec)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_gib))
    result = run(spec)
    with open(spec.result_path, "wb") as out:
        out.write(msgspec.json.encode(result))
    return 0


if __name__ == "__main__":
    # Run as the importable module, so vLLM's import of MODULE finds this run's globals.
    from trio_kv.tools.bench_vllm_engine import main as module_main

    sys.exit(module_main())
