"""What every ``trio-kv bench`` command shares: argument checks, running, failing, printing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import trio

from ..errors import single_cause

T = TypeVar("T")


class BenchFailed(Exception):
    """The system under test did not do what the benchmark asked (a chunk not stored, a miss,
    bytes that differ)."""


def bad_counts(bench: str, args: argparse.Namespace, names: Sequence[str]) -> bool:
    """Print a usage error and return True if any of these arguments is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            print(f"trio-kv bench {bench}: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return True
    return False


def run_or_fail(
    bench: str,
    function: Callable[..., Awaitable[T]],
    *args: Any,
    expected: tuple[type[BaseException], ...] = (),
) -> T | None:
    """``trio.run(function, *args)``; a BenchFailed (or one of ``expected``) is printed as the
    benchmark's failure and gives None, anything else is a bug and propagates."""
    try:
        return trio.run(function, *args)
    except Exception as exc:
        cause = single_cause(exc)
        if not isinstance(cause, (BenchFailed, *expected)):
            raise
        print(f"trio-kv bench {bench}: FAILED: {cause}", file=sys.stderr)
        return None


def emit(result: msgspec.Struct, as_json: bool, table: Callable[[Any], str]) -> None:
    """Print the result as one JSON object, or as the benchmark's table."""
    print(json.dumps(msgspec.to_builtins(result)) if as_json else table(result))
