"""glibc's non-temporal threshold: what GLIBC_TUNABLES becomes, and that ``trio-kv serve`` starts
with it (the same process, replaced once), keeps an operator's own, and can be told not to."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from trio_kv.cli import main
from trio_kv.nt_stores import (
    DEFAULT_THRESHOLD,
    TUNABLE,
    active_threshold,
    exec_with_threshold,
    started_as_trio_kv,
    supported,
    tunables_with,
)

TRIO_KV = [sys.executable, "-m", "trio_kv"]


def test_the_threshold_is_added_to_the_operator_s_other_tunables():
    assert tunables_with("", 262144) == f"{TUNABLE}=262144"
    assert (
        tunables_with("glibc.malloc.arena_max=2", 4096 * 64) == f"glibc.malloc.arena_max=2:{TUNABLE}=262144"
    )


def test_a_threshold_set_already_is_kept():
    assert tunables_with(f"glibc.malloc.arena_max=2:{TUNABLE}=1048576", 262144) is None


def test_the_active_threshold_is_read_from_the_environment():
    assert active_threshold({}) == 0
    assert active_threshold({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=0x40000"}) == 262144
    assert active_threshold({"GLIBC_TUNABLES": f"{TUNABLE}=lots"}) == 0


def test_only_the_trio_kv_command_is_replaced():
    assert started_as_trio_kv(["/usr/local/bin/trio-kv", "serve"])
    assert started_as_trio_kv([os.path.join("site-packages", "trio_kv", "__main__.py"), "serve"])
    assert not started_as_trio_kv(["/usr/bin/pytest"])
    assert not started_as_trio_kv([])


def test_a_process_that_only_imported_the_cli_is_never_replaced(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail(f"execve{args}"))
    exec_with_threshold(DEFAULT_THRESHOLD)  # pytest's argv[0] is not trio-kv: returns


def test_a_failed_replacement_is_said_and_the_process_goes_on(monkeypatch, capsys):
    def refuse(*args):
        raise PermissionError("execve not allowed here")

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(os, "execve", refuse)
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/trio-kv", "serve"])
    monkeypatch.setattr("trio_kv.nt_stores.supported", lambda: True)
    exec_with_threshold(DEFAULT_THRESHOLD)
    assert "execve not allowed here" in capsys.readouterr().err


def _serve_environment(tmp_path, **env: str) -> dict[str, str]:
    """GLIBC_TUNABLES of a running ``trio-kv serve`` (read from /proc), and that it is the
    process that was started (same pid, answering pings)."""
    url = f"ipc://{tmp_path}/kv.sock"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TRIO_KV_", "GLIBC_TUNABLES"))}
    proc = subprocess.Popen(
        [*TRIO_KV, "serve", "--listen", url, "--l1-size", "16MiB", "--no-admin"],
        env={**clean, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while main(["ping", "--url", url, "--timeout", "1"]) != 0:
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.1)  # polling an external process for readiness
        with open(f"/proc/{proc.pid}/environ", "rb") as environ:
            pairs = [item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item]
        return {k.decode(): v.decode() for k, v in pairs}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


needs_glibc_x86 = pytest.mark.skipif(not supported(), reason="glibc on x86-64 reads this tunable")


@needs_glibc_x86
def test_serve_runs_with_the_default_threshold(tmp_path):
    environ = _serve_environment(tmp_path)
    assert active_threshold(environ) == DEFAULT_THRESHOLD


@needs_glibc_x86
def test_serve_keeps_the_operator_s_threshold(tmp_path):
    environ = _serve_environment(tmp_path, GLIBC_TUNABLES=f"{TUNABLE}=1048576")
    assert environ["GLIBC_TUNABLES"] == f"{TUNABLE}=1048576"


@needs_glibc_x86
def test_a_zero_threshold_leaves_glibc_s_default(tmp_path):
    environ = _serve_environment(tmp_path, TRIO_KV_COPY_NT_THRESHOLD="0")
    assert "GLIBC_TUNABLES" not in environ
