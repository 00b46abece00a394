"""The in-tree device check (devcheck/) stays in step with the code it exercises.

The check itself needs a GPU machine and is never run here (docs/gpu.md, "Device check"): these
tests only read its scripts, and call its bench-summary parser on what ``bench gpu`` prints.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from trio_kv.cli import build_parser
from trio_kv.protocol import StatusResult
from trio_kv.server.config import load_config, tomllib
from trio_kv.tools.bench_gpu import GpuBenchResult, LayoutResult

ROOT = Path(__file__).resolve().parent.parent
DEVCHECK = ROOT / "devcheck"
SCRIPT = (DEVCHECK / "device_check.sh").read_text()
PYTHON_FILES = [DEVCHECK / "dc_engine.py", DEVCHECK / "dc_preflight.py"]


def test_the_cuda_extra_floor_is_the_cuda_bindings_the_device_check_carries():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [requirement] = [r for r in extras["cuda"] if r.startswith("cuda-bindings")]
    carried = re.search(r"^CUDA_BINDINGS_VERSION=(\S+)", SCRIPT, re.M)
    assert carried is not None, "device_check.sh names no CUDA_BINDINGS_VERSION"
    assert requirement == f"cuda-bindings>={carried.group(1)}", (requirement, carried.group(1))
    assert 'cuda_bindings-"$CUDA_BINDINGS_VERSION"-' in SCRIPT, "the script installs another wheel"


def test_every_trio_kv_name_the_device_check_imports_exists():
    pytest.importorskip("cuda.bindings")  # the scripts import the CUDA modules
    found = []
    for path in PYTHON_FILES:  # the scripts and the child processes' source in their strings
        for module, names in re.findall(r"from (trio_kv[\w.]*) import ([\w, ]+)", path.read_text()):
            found += [(path.name, module, name.strip()) for name in names.split(",")]
    assert len(found) > 8, found
    missing = [f for f in found if not hasattr(importlib.import_module(f[1]), f[2])]
    assert missing == [], missing


def _trio_kv_commands() -> list[list[str]]:
    """The trio-kv command lines device_check.sh runs (``-m trio_kv`` / ``-m trio_kv.cli``)."""
    joined = SCRIPT.replace("\\\n", " ")
    commands = []
    for line in re.findall(r"-m trio_kv(?:\.cli)? ([^|>&\n]*)", joined):
        commands.append([word for word in shlex.split(line) if not word.startswith("$")])
    return commands


def test_the_device_check_runs_trio_kv_with_flags_it_has():
    commands = _trio_kv_commands()
    assert {c[0] for c in commands} == {"serve", "bench"}, commands
    parser = build_parser()
    for command in commands:
        # Values that are shell expansions were dropped: give each flag that takes one a stand-in.
        args = []
        for word in command:
            args.append(word)
            if word in ("--listen", "--l1-size"):
                args.append("ipc:///tmp/x.sock" if word == "--listen" else "1GiB")
        parser.parse_args(args)  # SystemExit on an unknown flag
    assert "-m trio_kv serve" in SCRIPT.replace("\\\n", " ")


def test_the_killed_engine_probe_runs_a_server_with_a_ten_second_copy_bound():
    assert "start_server TRIO_KV_GPU_COPY_TIMEOUT_S=10" in SCRIPT
    config = load_config(environ={"TRIO_KV_GPU_COPY_TIMEOUT_S": "10"}, overrides={})
    assert config.gpu_copy_timeout_s == 10


def test_the_status_fields_the_engine_side_reads_exist():
    text = (DEVCHECK / "dc_engine.py").read_text()
    read = set(re.findall(r"\bst(?:atus\(\))?\.(\w+)", text)) - {"status"}
    assert read, "no status fields found"
    assert read <= set(StatusResult.__struct_fields__), read - set(StatusResult.__struct_fields__)


def test_the_bench_summary_reads_what_bench_gpu_prints(tmp_path):
    layout = LayoutResult("per_layer", 32768, 8192, 20.0, 21.0, 25.0, 26.0, 0.8, 0.81, True)
    result = GpuBenchResult(
        device=0, chunks=16, chunk_bytes=1 << 25, layers=32, rounds=5, target_ratio=0.8, layouts=[layout]
    )
    out = tmp_path / "bench_gpu.out"
    progress = "[10:00:00] bench gpu: per_layer layout, 5 rounds\n"  # its stderr, merged in by run_step
    out.write_text(progress + json.dumps(msgspec.to_builtins(result)) + "\nRESULT bench-gpu: rc=0\n")
    done = subprocess.run(
        [sys.executable, str(DEVCHECK / "dc_engine.py"), "summarize-bench", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bench-gpu per_layer: store 20.0 GB/s (0.80x d2h 25.0)" in done.stdout, done.stdout
    assert "8192 pieces, verified=True" in done.stdout


def test_the_wheels_stay_out_of_git():
    assert "devcheck/wheels/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_engine_side_clears_only_its_own_salt():
    # A Clear of every salt is an admin action: the check's client has no admin token.
    assert ".clear()" not in (DEVCHECK / "dc_engine.py").read_text()


@pytest.mark.parametrize("script", ["device_check.sh", "rehearse_on_stub.sh"])
def test_the_scripts_parse_and_name_files_that_exist(script):
    path = DEVCHECK / script
    subprocess.run(["bash", "-n", str(path)], check=True, capture_output=True, timeout=30)
    for named in re.findall(r"(?<![\w$/.-])((?:tests|devcheck)/[\w./-]+\.(?:c|py|sh))", path.read_text()):
        assert (ROOT / named).is_file(), (script, named)


def test_the_preflight_asks_for_every_driver_name_trio_kv_uses_and_the_installed_bindings_have_them():
    pytest.importorskip("cuda.bindings")
    spec = importlib.util.spec_from_file_location("dc_preflight", DEVCHECK / "dc_preflight.py")
    assert spec is not None and spec.loader is not None
    preflight = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preflight)
    used = preflight.driver_names_used()
    assert {"cuIpcOpenMemHandle", "cuStreamCreateWithPriority", "CUmemcpyAttributes"} <= used  # a scan
    assert preflight.features() == []
