"""The trio-kv command as a user runs it: a real process, real signals, real sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from trio_kv.cli import main

from .server_process import ServerProcess

TRIO_KV = [sys.executable, "-m", "trio_kv"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_KV_")}
    env.update(extra)
    return env


def wait_for_ping(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if main(["ping", "--url", url, "--timeout", "1"]) == 0:
            return
        time.sleep(0.1)  # polling an external process for readiness
    raise AssertionError(f"server at {url} never answered")


@pytest.fixture
def socket_url(tmp_path):
    return f"ipc://{tmp_path}/kv.sock", tmp_path / "kv.sock"


def start_server(url: str, *flags: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        # A free admin port: the default 8470 may be held by another server on this machine.
        [*TRIO_KV, "serve", "--listen", url, "--l1-size", "64MiB", "--admin", "127.0.0.1:0", *flags],
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_pings_and_shuts_down_cleanly_on_signal(socket_url, signum):
    url, path = socket_url
    proc = start_server(url)
    try:
        wait_for_ping(url)
        assert path.exists()
        assert (path.stat().st_mode & 0o777) == 0o600
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert not path.exists(), "socket file left behind"
    assert "draining" in stderr


def test_ping_fails_when_nobody_listens(socket_url, capsys):
    url, _ = socket_url
    assert main(["ping", "--url", url, "--timeout", "1"]) == 1
    assert "no trio-kv server answers" in capsys.readouterr().err


def test_stale_socket_file_is_replaced(socket_url):
    url, path = socket_url
    import socket as pysocket

    stale = pysocket.socket(pysocket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    proc = start_server(url)
    try:
        wait_for_ping(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_a_second_server_on_the_same_socket_is_refused(socket_url):
    url, _ = socket_url
    first = start_server(url)
    try:
        wait_for_ping(url)
        second = start_server(url)
        _, stderr = second.communicate(timeout=20)
        assert second.returncode == 1
        assert "already listening" in stderr
        wait_for_ping(url)  # the first one is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=20)


def print_config(*args: str, **env: str) -> dict:
    out = subprocess.run(
        [*TRIO_KV, "serve", "--print-config", *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_print_config_merges_file_environment_and_flags(tmp_path):
    config_file = tmp_path / "kv.toml"
    config_file.write_text('l1_size = "1GiB"\nchunk_size = 128\nlog_level = "debug"\n')
    merged = print_config("--config", str(config_file), "--chunk-size", "512", TRIO_KV_LOG_LEVEL="warning")
    assert merged["l1_size"] == 1024**3  # from the file
    assert merged["log_level"] == "warning"  # environment beats the file
    assert merged["chunk_size"] == 512  # flags beat everything
    assert merged["listen"] == ["ipc:///tmp/trio-kv.sock"]  # the documented default


def test_environment_can_name_the_config_file_and_listen_urls(tmp_path):
    config_file = tmp_path / "kv.toml"
    config_file.write_text("chunk_size = 64\n")
    merged = print_config(
        TRIO_KV_CONFIG=str(config_file),
        TRIO_KV_LISTEN="ipc:///tmp/a.sock,tcp://127.0.0.1:5555",
        TRIO_KV_ALLOW_UNAUTHENTICATED_TCP="true",
    )
    assert merged["chunk_size"] == 64
    assert merged["listen"] == ["ipc:///tmp/a.sock", "tcp://127.0.0.1:5555"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--l1-size", "lots"], "not a size"),
        (["--chunk-size", "0"], "chunk_size"),
        (["--listen", "http://x"], "ipc:// or tcp://"),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(args, message):
    out = subprocess.run(
        [*TRIO_KV, "serve", *args], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert message in out.stderr


def test_help_explains_the_defaults():
    out = subprocess.run([*TRIO_KV, "serve", "--help"], capture_output=True, text=True, check=True)
    assert "ipc:///tmp/trio-kv.sock" in out.stdout
    assert "TRIO_KV_" in out.stdout


def test_socket_mode_can_open_the_socket_to_the_group(socket_url):
    url, path = socket_url
    proc = start_server(url, TRIO_KV_SOCKET_MODE="0660")
    try:
        wait_for_ping(url)
        assert (path.stat().st_mode & 0o777) == 0o660
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_socket_mode_never_opens_the_socket_to_others():
    out = subprocess.run(
        [*TRIO_KV, "serve", "--print-config"],
        env=clean_env(TRIO_KV_SOCKET_MODE="0666"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "nothing to others" in out.stderr


def test_transfer_flag_reaches_the_config():
    assert print_config("--transfer", "cpu")["transfer"] == "cpu"
    assert print_config()["transfer"] == "auto"


def test_bench_lists_every_benchmark():
    out = subprocess.run([*TRIO_KV, "bench", "--help"], capture_output=True, text=True, check=True)
    for name in ("cpu", "fs", "s3", "gpu", "soak"):
        assert f"    {name} " in out.stdout, name


def test_bench_fs_runs_through_the_command_line(tmp_path):
    out = subprocess.run(
        [
            *TRIO_KV,
            "bench",
            "fs",
            "--chunks",
            "2",
            "--chunk-mib",
            "1",
            "--rounds",
            "1",
            "--json",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["verified"] is True
    assert result["write_gbps"] > 0 and result["raw_write_gbps"] > 0


def test_serve_moves_what_its_start_made_out_of_the_cycle_collector_s_reach(tmp_path):
    """A full collection walks every tracked object: frozen once started, the ~10^5 objects of
    the imports and the engine cost it nothing (tests/server_process.py serves the command)."""
    with ServerProcess(tmp_path, tmp_path / "l2") as server:
        server.start()
        with urllib.request.urlopen(server.admin_url + "/metrics", timeout=10) as response:
            text = response.read().decode()
    found = re.search(r"^trio_kv_gc_frozen_objects (\S+)$", text, re.MULTILINE)
    assert found is not None, text[:500]
    assert float(found.group(1)) > 50_000
