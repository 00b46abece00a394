"""``trio-kv status`` and ``trio-kv quota``: clients of the admin HTTP API (standard library only).

Exit codes: 0 done, 1 the server is unreachable or answered an HTTP error (the message goes
to stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from ..sizes import format_size

DEFAULT_ADMIN_URL = "http://127.0.0.1:8470"
TOKEN_ENV = "TRIO_KV_ADMIN_TOKEN"
BAR_WIDTH = 24


class AdminError(Exception):
    """The server could not be reached or answered with an error (exit 1)."""


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot tell (exit 2)."""


class AdminClient:
    """A tiny JSON-over-HTTP client for one admin URL."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; return the decoded JSON answer or raise AdminError."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise AdminError(f"{method} {path}: HTTP {exc.code}: {_error_message(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise AdminError(f"cannot reach the admin API at {self.url}: {reason}") from None
        try:
            return json.loads(payload)
        except ValueError:
            raise AdminError(f"{method} {path}: the answer is not JSON") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


# ---------------------------------------------------------------- parsers


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=DEFAULT_ADMIN_URL, help=f"the server's admin URL (default {DEFAULT_ADMIN_URL})"
    )
    parser.add_argument("--token", help=f"admin bearer token (default ${TOKEN_ENV})")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``status`` and ``quota`` to the ``trio-kv`` command's subparsers."""
    status = subparsers.add_parser(
        "status",
        help="show a running server's usage, tiers, tenants and hit rates",
        description="Show a running server's status (GET /v1/status on its admin API).",
    )
    _connection_args(status)
    status.add_argument("--json", action="store_true", help="print the raw status JSON")

    quota = subparsers.add_parser(
        "quota",
        help="set, show or remove per-tenant byte quotas",
        description=(
            "Per-tenant (cache_salt) byte quotas per tier. SALT @empty names the empty salt, "
            "@default the quota of salts without their own. TIER is l1 or an L2 tier's name "
            "as status shows it (e.g. fs:/data/kv); SIZE is like 8GiB, 500GB or 4096."
        ),
    )
    actions = quota.add_subparsers(dest="quota_command", required=True, metavar="ACTION")
    set_ = actions.add_parser("set", help="set (merge) quotas: quota set SALT TIER=SIZE [TIER=SIZE...]")
    set_.add_argument("salt", metavar="SALT")
    set_.add_argument("limits", nargs="+", metavar="TIER=SIZE")
    get = actions.add_parser("get", help="show a salt's quotas and usage")
    get.add_argument("salt", metavar="SALT")
    get.add_argument("--json", action="store_true", help="print the raw JSON")
    list_ = actions.add_parser("list", help="show every quota")
    list_.add_argument("--json", action="store_true", help="print the raw JSON")
    delete = actions.add_parser("delete", help="remove a salt's quotas (all, or one tier)")
    delete.add_argument("salt", metavar="SALT")
    delete.add_argument("--tier", help="remove only this tier's quota")
    for parser in (set_, get, list_, delete):
        _connection_args(parser)


def _client(args: argparse.Namespace) -> AdminClient:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    return AdminClient(args.url, token or None, args.timeout)


def _run(name: str, action: Callable[[], None]) -> int:
    try:
        action()
    except AdminError as exc:
        print(f"trio-kv {name}: {exc}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"trio-kv {name}: {exc}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    def action() -> None:
        status = _client(args).request("GET", "/v1/status")
        print(json.dumps(status, indent=2) if args.json else render_status(status, args.url))

    return _run("status", action)


def render_status(status: dict[str, Any], url: str = "") -> str:
    """The terminal view of a /v1/status answer."""
    config = status.get("config", {})
    lines = [
        " · ".join(
            part
            for part in (
                f"trio-kv {status['version']}",
                url,
                f"up {_duration(status['uptime_s'])}",
                f"chunk {status['chunk_size']} tokens",
                f"eviction {config.get('eviction_policy', '?')}",
                "DRAINING" if status.get("draining") else "",
            )
            if part
        ),
        f"requests in flight {status['requests_in_flight']} · leases {status['leases']} · "
        f"sessions {status['sessions']} · instances {len(status['instances'])} · "
        f"event-loop lag {status.get('event_loop_lag_s', 0.0) * 1000:.1f} ms",
        "",
    ]
    tiers = [("l1", status["l1"], "ok", f"{status['l1_entries']} chunks")]
    for tier in status.get("l2", []):
        state = tier["state"] if tier["healthy"] else f"{tier['state'].upper()} {tier['reason']}".strip()
        detail = f"queue {tier['queue_depth']} · written {tier['written']} · dropped {tier['dropped']}"
        tiers.append((tier["name"], tier["usage"], state, detail))
    width = max(len("TIER"), *(len(name) for name, *_ in tiers))
    lines.append(f"{'TIER':<{width}}  {'USAGE':<{BAR_WIDTH + 9}}  {'USED / CAPACITY':<23}  STATE")
    for name, usage, state, detail in tiers:
        used, capacity = usage["total_bytes_used"], usage["total_capacity_bytes"]
        lines.append(
            f"{name:<{width}}  {_bar(used, capacity)}  {_of(used, capacity):<23}  {state}  ({detail})"
        )

    quotas = status.get("quotas", {})
    rows = []
    for order, (name, usage, *_) in enumerate(tiers):
        for salt, used in usage["bytes_by_salt"].items():
            rows.append((_salt_name(salt), order, name, used, *_limit(quotas, _salt_name(salt), name)))
    if rows:
        salt_width = max(len("SALT"), *(len(r[0]) for r in rows))
        lines += [
            "",
            f"{'SALT':<{salt_width}}  {'TIER':<{width}}  {'USAGE (of quota)':<{BAR_WIDTH + 9}}  USED / QUOTA",
        ]
        for salt, _, tier, used, limit, source in sorted(rows):
            lines.append(
                f"{salt:<{salt_width}}  {tier:<{width}}  {_bar(used, limit)}  "
                f"{_of(used, limit, 'no quota')}{source}"
            )

    traffic = status.get("traffic", {})
    by_salt = traffic.get("by_salt", {})
    if by_salt:
        salt_width = max(len("LOOKUPS BY SALT"), *(len(s) for s in by_salt))
        lines += [
            "",
            f"{'LOOKUPS BY SALT':<{salt_width}}  {'LOOKUPS':>8}  {'HIT L1':>10}  {'HIT L2':>10}  "
            f"{'MISS':>10}  HIT RATE (tokens)",
        ]
        for salt, counts in [*sorted(by_salt.items()), ("all", traffic["total"])]:
            hits = counts["l1_hit_tokens"] + counts["l2_hit_tokens"]
            asked = hits + counts["miss_tokens"]
            rate = f"{100 * hits / asked:5.1f}%" if asked else "    -"
            lines.append(
                f"{salt:<{salt_width}}  {counts['lookups']:>8}  {counts['l1_hit_tokens']:>10}  "
                f"{counts['l2_hit_tokens']:>10}  {counts['miss_tokens']:>10}  {rate}"
            )
    return "\n".join(lines)


def _bar(used: int, capacity: int | None) -> str:
    """``[#######-----]  58.3%``, or an empty bar when there is nothing to measure against."""
    if capacity is None:
        return f"[{' ' * BAR_WIDTH}]       "
    fraction = used / capacity if capacity else float(used > 0)
    filled = min(BAR_WIDTH, round(fraction * BAR_WIDTH))
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {100 * fraction:5.1f}%"


def _of(used: int, capacity: int | None, unbounded: str = "unbounded") -> str:
    return f"{format_size(used)} / {format_size(capacity) if capacity is not None else unbounded}"


def _salt_name(salt: str) -> str:
    return "@empty" if salt == "" else salt


def _limit(quotas: dict[str, dict[str, int]], salt_name: str, tier: str) -> tuple[int | None, str]:
    """The quota that applies, and " (@default)" when it is the default's."""
    own = quotas.get(salt_name, {})
    if tier in own:
        return own[tier], ""
    default = quotas.get("@default", {}).get(tier)
    return default, "" if default is None else " (@default)"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


# ---------------------------------------------------------------- quota


def _quota_path(salt: str) -> str:
    return "/v1/quota/" + urllib.parse.quote(salt, safe="@")


def parse_limits(items: list[str]) -> dict[str, str]:
    """``["l1=8GiB", "fs:/data/kv=500GB"]`` -> ``{"l1": "8GiB", ...}`` (the server checks sizes)."""
    limits = {}
    for item in items:
        tier, sep, size = item.rpartition("=")
        if not sep or not tier or not size.strip():
            raise UsageError(f"{item!r} is not TIER=SIZE (e.g. l1=8GiB)")
        limits[tier] = size.strip()
    return limits


def cmd_quota(args: argparse.Namespace) -> int:
    def action() -> None:
        client = _client(args)
        command = args.quota_command
        if command == "set":
            limits = parse_limits(args.limits)
            answer = client.request("PUT", _quota_path(args.salt), limits)
            print(f"{answer['salt']}: {_quota_text(answer['quota'])}")
        elif command == "get":
            answer = client.request("GET", _quota_path(args.salt))
            print(json.dumps(answer, indent=2) if args.json else _render_quota(answer))
        elif command == "list":
            answer = client.request("GET", "/v1/quota")
            print(json.dumps(answer, indent=2) if args.json else _render_quota_list(answer))
        else:
            path = _quota_path(args.salt)
            if args.tier is not None:
                path += "?" + urllib.parse.urlencode({"tier": args.tier})
            answer = client.request("DELETE", path)
            what = "every quota" if answer["deleted"] == "all" else f"the {answer['deleted']} quota"
            print(f"{answer['salt']}: deleted {what}")

    return _run("quota", action)


def _quota_text(quota: dict[str, int]) -> str:
    ordered = sorted(quota.items(), key=lambda item: (item[0] != "l1", item[0]))
    return ", ".join(f"{tier} {format_size(limit)}" for tier, limit in ordered) or "none"


def _render_quota(answer: dict[str, Any]) -> str:
    quota, usage = answer["quota"], answer.get("usage")
    tiers = sorted(set(quota) | set(usage or {}), key=lambda tier: (tier != "l1", tier))
    width = max(len("TIER"), *(len(t) for t in tiers))
    lines = [answer["salt"], f"  {'TIER':<{width}}  {'QUOTA':>12}  {'USED':>12}"]
    for tier in tiers:
        limit = quota.get(tier)
        used = None if usage is None else usage.get(tier, 0)
        share = f"  ({100 * used / limit:.1f}%)" if used is not None and limit else ""
        lines.append(
            f"  {tier:<{width}}  {format_size(limit) if limit is not None else '-':>12}  "
            f"{format_size(used) if used is not None else '-':>12}{share}"
        )
    return "\n".join(lines)


def _render_quota_list(answer: dict[str, Any]) -> str:
    quotas: dict[str, dict[str, int]] = answer["quotas"]
    if not quotas:
        return f"no quotas set (tiers: {', '.join(answer['tiers'])})"
    salt_width = max(len("SALT"), *(len(s) for s in quotas))
    lines = [f"{'SALT':<{salt_width}}  QUOTAS"]
    for salt, quota in sorted(quotas.items()):
        lines.append(f"{salt:<{salt_width}}  {_quota_text(quota)}")
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"status": cmd_status, "quota": cmd_quota}
