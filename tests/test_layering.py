"""The package's rooms keep their rules (docs/architecture.md): imports point one way, files stay
small, and an engine-side install needs none of the server's dependencies."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
assert _spec is not None and _spec.loader is not None
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

# Each room and the rooms it may import (every import counts, lazy ones too). The order of this
# table is the floor plan, lowest first; docs/architecture.md draws it.
BASE = {"trio_kv.errors", "trio_kv.sizes", "trio_kv.keys", "trio_kv.protocol", "trio_kv.msgpack_peek"}
ALLOWED: dict[str, set[str]] = {
    "trio_kv": set(),
    "trio_kv.errors": set(),
    "trio_kv.sizes": set(),
    "trio_kv.msgpack_peek": set(),
    "trio_kv.nt_stores": set(),
    "trio_kv.keys": {"trio_kv.errors"},
    "trio_kv.protocol": {"trio_kv.errors", "trio_kv.keys", "trio_kv.msgpack_peek"},
    "trio_kv.req_contexts": set(),
    "trio_kv.client": BASE | {"trio_kv.req_contexts"},
    "trio_kv.export": BASE,
    "trio_kv.adapters": BASE,
    "trio_kv.transfer": BASE | {"trio_kv.export"},
    "trio_kv.core": BASE | {"trio_kv.adapters", "trio_kv.transfer", "trio_kv.export"},
    "trio_kv.server": BASE
    | {"trio_kv.core", "trio_kv.adapters", "trio_kv.transfer", "trio_kv.export", "trio_kv.nt_stores"},
    "trio_kv.vllm": BASE | {"trio_kv.client", "trio_kv.export", "trio_kv.req_contexts"},
    "trio_kv.testing": BASE
    | {"trio_kv.server", "trio_kv.core", "trio_kv.adapters", "trio_kv.transfer", "trio_kv.export"}
    | {"trio_kv.client"},
}
ALLOWED["trio_kv.tools"] = set(ALLOWED) | {"trio_kv.testing", "trio_kv.vllm"}
ALLOWED["trio_kv.cli"] = ALLOWED["trio_kv.tools"] | {"trio_kv.tools"}
ALLOWED["trio_kv.__main__"] = {"trio_kv.cli"}

MAX_LINES = 400
MAX_FLOORS = 12
MAX_ARROWS = 70
# What `pip install trio-kv` leaves out (the [server], [s3] and [cuda] extras).
EXTRAS_ONLY = ["boto3", "botocore", "hypercorn", "prometheus_client", "cuda", "xxhash"]


def test_every_room_has_a_rule():
    rooms, _ = import_graph.build(ROOT)
    assert sorted(rooms - set(ALLOWED)) == []


def test_no_room_imports_outside_its_rule():
    _, arrows = import_graph.build(ROOT)
    broken = sorted(f"{a} -> {b}" for a, b in arrows if b not in ALLOWED.get(a, set()))
    assert broken == []


def test_the_import_graph_has_no_cycle_and_stays_within_the_floor_plan():
    rooms, arrows = import_graph.build(ROOT)
    floor, cycle = import_graph.floors(rooms, arrows)
    assert cycle == []
    assert max(floor.values()) <= MAX_FLOORS
    assert len(arrows) <= MAX_ARROWS


def test_the_simulator_is_imported_only_by_itself():
    importers = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "trio_kv").rglob("*.py")
        if "vllm/sim/" not in path.as_posix()
        and any(m.startswith("trio_kv.vllm.sim") for m in import_graph.imported_modules(path, ROOT))
    ]
    assert importers == []


def test_no_module_is_over_the_size_limit():
    long = {
        path.relative_to(ROOT).as_posix(): n
        for path in (ROOT / "trio_kv").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def _run_without(blocked: list[str], code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in which ``blocked`` packages cannot be imported."""
    prelude = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class _Blocked(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, _Blocked())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "module", ["trio_kv.client", "trio_kv.protocol", "trio_kv.keys", "trio_kv.vllm.scheduler", "trio_kv.cli"]
)
def test_the_client_side_imports_without_extras_or_torch(module):
    done = _run_without(EXTRAS_ONLY, f"import {module}, sys; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(
    "module",
    ["trio_kv.export.shm", "trio_kv.export.memfd", "trio_kv.vllm.worker", "trio_kv.vllm.registration"],
)
def test_the_engine_side_imports_without_extras(module):
    done = _run_without(EXTRAS_ONLY, f"import {module}")
    assert done.returncode == 0, done.stderr


def test_serve_without_the_server_extra_says_what_to_install():
    done = _run_without(EXTRAS_ONLY, "from trio_kv.cli import main; raise SystemExit(main(['serve']))")
    assert done.returncode == 2, done.stderr
    assert "pip install 'trio-kv[server]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_lists_every_bench_even_without_extras():
    done = _run_without(EXTRAS_ONLY, "from trio_kv.cli import main; main(['bench', '--help'])")
    assert done.returncode == 0, done.stderr
    for name in ("cpu", "fs", "s3", "gpu", "soak", "vllm"):
        assert f"    {name} " in done.stdout, name
    assert "pip install 'trio-kv[s3]'" in done.stdout


def test_the_server_runs_the_cpu_path_without_cuda_python():
    code = """
    from trio_kv.transfer import CudaUnavailable, select_backend
    assert type(select_backend("auto")).__name__ == "CpuTransfer"
    try:
        select_backend("cuda")
    except CudaUnavailable as exc:
        print(exc)
    """
    done = _run_without(["cuda"], code)
    assert done.returncode == 0, done.stderr
    assert "pip install 'trio-kv[cuda]'" in done.stdout
