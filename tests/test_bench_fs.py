"""``trio-kv bench fs`` at a tiny size: every figure is reported and the ratios are ratios of them."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from trio_kv.tools import bench_fs

FIGURES = (
    "write_gbps",
    "read_gbps",
    "raw_write_gbps",
    "raw_read_gbps",
    "write_ratio",
    "read_ratio",
    "raw_write_2t_gbps",
    "raw_read_2t_gbps",
    "write_ratio_2t",
    "read_ratio_2t",
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trio-kv bench")
    bench_fs.add_parser(parser.add_subparsers(dest="bench", required=True))
    return parser.parse_args(["fs", *argv])


def tiny(tmp_path, *argv: str) -> argparse.Namespace:
    return parse("--dir", str(tmp_path), "--chunks", "3", "--chunk-mib", "1", "--rounds", "2", *argv)


def test_the_defaults_are_sixteen_chunks_of_32_mib_in_three_rounds_under_tmp():
    args = parse()
    assert (args.chunks, args.chunk_mib, args.rounds, args.dir, args.json) == (16, 32, 3, None, False)


def test_json_reports_every_figure_with_ratios_of_the_figures(tmp_path, capsys):
    # Sync on purpose: main() calls trio.run itself.
    assert bench_fs.main(tiny(tmp_path, "--json")) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    progress = [line.split("] ", 1)[1] for line in captured.err.splitlines()]
    assert progress == ["bench fs: round 1/2", "bench fs: round 2/2"]  # stderr, never in the JSON
    for name in FIGURES:
        value = report[name]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    assert report["write_ratio"] == pytest.approx(report["write_gbps"] / report["raw_write_gbps"])
    assert report["read_ratio"] == pytest.approx(report["read_gbps"] / report["raw_read_gbps"])
    assert report["write_ratio_2t"] == pytest.approx(report["write_gbps"] / report["raw_write_2t_gbps"])
    assert report["read_ratio_2t"] == pytest.approx(report["read_gbps"] / report["raw_read_2t_gbps"])
    assert report["verified"] is True
    assert (report["chunks"], report["chunk_bytes"], report["rounds"]) == (3, 2**20, 2)
    assert report["directory"].startswith(str(tmp_path))


def test_the_run_leaves_nothing_behind_in_the_directory(tmp_path, capsys):
    assert bench_fs.main(tiny(tmp_path)) == 0
    assert list(tmp_path.iterdir()) == []


def test_the_table_names_each_figure_and_its_target(tmp_path, capsys):
    assert bench_fs.main(tiny(tmp_path)) == 0
    out = capsys.readouterr().out
    for label in ("raw write", "adapter write", "raw read", "adapter read", "target >= 0.8x raw"):
        assert label in out


@pytest.mark.parametrize("option", ["--chunks", "--chunk-mib", "--rounds"])
def test_a_count_below_one_is_refused(tmp_path, capsys, option):
    assert bench_fs.main(tiny(tmp_path, option, "0")) == 2
    assert option in capsys.readouterr().err
