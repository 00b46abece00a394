"""A Trio test's skip or xfail keeps its reason in the report (tests/conftest.py works around
pytest-trio 0.8, which re-raises them bare). The device check's `-rs` line is how a GPU run says
why a test did not run, so the reason has to survive."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TESTS = textwrap.dedent(
    """
    import pytest, trio

    async def test_skips_at_once():
        pytest.skip("reason one")

    async def test_skips_after_a_checkpoint():
        await trio.sleep(0)
        pytest.skip("reason two")

    async def test_skips_inside_a_nursery():
        async def skip():
            pytest.skip("reason three")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(skip)

    async def test_xfails():
        pytest.xfail("reason four")

    async def test_skip_beside_a_failure_fails():
        async def skip():
            pytest.skip("not this")
        async def fail():
            raise RuntimeError("boom")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(skip)
            nursery.start_soon(fail)
    """
)


def test_a_trio_tests_skip_and_xfail_reasons_reach_the_report(tmp_path):
    (tmp_path / "test_cases.py").write_text(TESTS)
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_pyfunc_call  # noqa: F401\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsxf", "-p", "no:cacheprovider", "-o", "trio_mode=true"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = done.stdout
    assert "1 failed, 3 skipped, 1 xfailed" in report, report[-3000:]
    for line, reason in ((5, "reason one"), (9, "reason two"), (13, "reason three")):
        assert f"SKIPPED [1] test_cases.py:{line}: {reason}" in report, report[-3000:]
    assert "reason four" in report, report[-3000:]
    assert "RuntimeError" in report and "Skipped\n" not in report, report[-3000:]
