"""``trio-kv bench soak``: the fault-injection soak of ``trio_kv.tools.soak``, as long as asked."""

from __future__ import annotations

import argparse
import logging

import msgspec
import trio

from . import bench_refs as refs
from .soak import run_soak


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "soak",
        help="many clients, failing adapters, killed clients; then audit for leaks",
        description=(
            "Run an in-process server with two in-memory L2 tiers that fail, stall and recover at "
            "random, and many clients doing random store/lookup/retrieve/release/end-session/abort "
            "requests, killed mid-request now and then, an engine that truncates its plain KV file "
            "under the server, and a hostile client that sends decode bombs (each must get "
            "BAD_REQUEST or UNKNOWN_REQUEST). Afterwards every lease, byte and task is "
            "audited and every retrieved byte was checked. Exits 1 if anything leaked or differed."
        ),
    )
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    logging.getLogger("trio_kv").setLevel(logging.ERROR)
    report = trio.run(
        lambda: run_soak(args.seconds, clients=args.clients, seed=args.seed, progress=refs.progress)
    )
    healthy = not (
        report.leaked_leases
        or report.leaked_bytes
        or report.ledger_problems
        or report.l2_ledger_mismatches
        or report.leaked_tasks
        or report.data_mismatches
        or report.truncation_surprises
        or report.bomb_wrong_replies
    )
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        for name in report.__struct_fields__:
            print(f"{name:32} {getattr(report, name)}")
        print("healthy" if healthy else "LEAKS OR MISMATCHES FOUND")
    return 0 if healthy else 1
