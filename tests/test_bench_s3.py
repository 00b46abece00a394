"""``trio-kv bench s3`` at a tiny size: every figure is reported, positive, and the ratios add up."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import pytest

from trio_kv.tools import bench_s3

from .s3_server import running_s3_server, use_fake_credentials

FIGURES = ("write_gbps", "read_gbps", "direct_write_gbps", "direct_read_gbps", "write_ratio", "read_ratio")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_s3.add_parser(parser.add_subparsers(dest="bench"))
    return parser.parse_args(["s3", *argv])


def check_report(report: dict[str, Any], chunk_bytes: int) -> None:
    for name in FIGURES:
        value = report[name]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    assert report["write_ratio"] == pytest.approx(report["write_gbps"] / report["direct_write_gbps"])
    assert report["read_ratio"] == pytest.approx(report["read_gbps"] / report["direct_read_gbps"])
    assert report["verified"] is True
    assert report["chunk_bytes"] == chunk_bytes
    assert str(report["library"]).startswith("boto3 ")


def test_bench_s3_starts_its_own_server_by_default_and_reports_every_figure(capsys):
    # Sync on purpose: main() calls trio.run itself.
    status = bench_s3.main(parse(["--json", "--chunks", "2", "--chunk-mib", "0.01", "--rounds", "2"]))
    assert status == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    check_report(report, int(0.01 * 1024 * 1024))
    assert report["endpoint"] == "local-moto"
    assert (report["chunks"], report["rounds"]) == (2, 2)
    # Progress goes to stderr, one line per round after the warm-up's, and never into the JSON.
    assert [line.split("] ", 1)[1] for line in captured.err.splitlines() if "bench s3:" in line] == [
        "bench s3: local-moto, warm-up",
        "bench s3: local-moto, round 1/2",
        "bench s3: local-moto, round 2/2",
    ]


def test_bench_s3_uses_the_endpoint_and_bucket_it_is_given(capsys, monkeypatch):
    use_fake_credentials(monkeypatch)
    with running_s3_server() as server:
        argv = ["--json", "--endpoint", server.endpoint_url, "--bucket", "bench-given", "--chunks", "1"]
        status = bench_s3.main(parse([*argv, "--chunk-mib", "0.001", "--rounds", "1"]))
        assert status == 0
        assert server.object_names("bench-given") == []  # created, used, cleaned up
    report = json.loads(capsys.readouterr().out)
    check_report(report, int(0.001 * 1024 * 1024))
    assert report["endpoint"] == server.endpoint_url
