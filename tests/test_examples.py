"""The README's example runs as written against a real server."""

import os
import sys
from pathlib import Path

import trio

from trio_kv.testing import running_server

EXAMPLE = Path(__file__).parent.parent / "examples" / "quickstart.py"


async def test_quickstart_example_runs_and_bytes_match():
    async with running_server() as server:
        result = await trio.run_process(
            [sys.executable, str(EXAMPLE)],
            env={**os.environ, "TRIO_KV_URL": server.url},
            capture_stdout=True,
            capture_stderr=True,
        )
    out = result.stdout.decode()
    assert "bytes match" in out
    assert "hit_tokens=512" in out
