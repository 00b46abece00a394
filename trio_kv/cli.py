"""The ``trio-kv`` command: serve, ping, bench, status, quota."""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from . import __version__
from .errors import single_cause
from .server.config import DEFAULT_LISTEN, ConfigError, ServerConfig, config_json, load_config
from .tools import admin_cli

log = logging.getLogger("trio_kv")

SERVE_EPILOG = f"""\
Settings come from, lowest first: built-in defaults, a TOML file (--config or
$TRIO_KV_CONFIG), TRIO_KV_<SETTING> environment variables (e.g.
TRIO_KV_L1_SIZE=8GiB, TRIO_KV_LISTEN=ipc:///run/kv.sock,tcp://127.0.0.1:5555),
then these flags. The default listen URL is {DEFAULT_LISTEN}.
SIGINT or SIGTERM drains in-flight requests and removes the socket file."""


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the server",
        description=(
            "Run a trio-kv server: L1 in CPU memory, optional L2 tiers (fs, s3), the CUDA transfer "
            "path when a GPU is present (else shared memory), and an admin HTTP API."
        ),
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        action="append",
        metavar="URL",
        help=f"ipc:///path or tcp://host:port; repeatable (default {DEFAULT_LISTEN})",
    )
    p.add_argument("--l1-size", metavar="SIZE", help="L1 arena size, e.g. 8GiB, 512MiB (default 2GiB)")
    p.add_argument("--chunk-size", type=int, metavar="TOKENS", help="tokens per chunk (default 256)")
    p.add_argument("--config", metavar="FILE", help="TOML file with settings (same names as ServerConfig)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"])
    p.add_argument("--workers", type=int, metavar="N", help="concurrent requests per listen URL (default 64)")
    p.add_argument("--request-timeout", type=float, metavar="SECONDS", dest="request_timeout_s")
    p.add_argument(
        "--lease-ttl",
        type=float,
        metavar="SECONDS",
        dest="lease_ttl_s",
        help="how long a lookup's pins last without a retrieve (default 60)",
    )
    p.add_argument(
        "--transfer",
        choices=["auto", "cpu", "cuda"],
        help="transfer backend: cuda (CUDA IPC KV caches, pinned L1), cpu (shared memory only), "
        "or auto: cuda when a device and driver are present (default auto)",
    )
    p.add_argument(
        "--shm-dir", metavar="DIR", help="where clients' shared-memory files must live (default /dev/shm)"
    )
    p.add_argument(
        "--l2",
        action="append",
        metavar="SPEC",
        help="an L2 tier, repeatable, in lookup priority order: fs:DIR[?capacity=SIZE] or "
        "s3://BUCKET[/PREFIX][?endpoint=URL&region=R&capacity=SIZE] (see README)",
    )
    p.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="admin HTTP address (default 127.0.0.1:8470; port 0: any free port)",
    )
    p.add_argument("--no-admin", action="store_const", const=True, help="do not serve the admin HTTP API")
    p.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="bearer token required by mutating admin endpoints (prefer $TRIO_KV_ADMIN_TOKEN: "
        "flags are visible to other local users)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the merged configuration as JSON and exit"
    )


def _ping_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ping", help="exit 0 if a server answers", description="Ping a trio-kv server.")
    p.add_argument("--url", help=f"server URL (default $TRIO_KV_URL or {DEFAULT_LISTEN})")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure throughput and latency against references")
    bench_sub = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    cpu = bench_sub.add_parser(
        "cpu",
        help="store/retrieve/lookup on the CPU path vs memmove, a raw nng echo server and redis",
        description=(
            "Start `trio-kv serve` and a blocking pynng Rep0 echo server, each in a process of its "
            "own; register a shared-memory KV cache of Llama-3-8B's shape (32 layers, 8 KV heads, "
            "head size 128, bf16; 256-token chunks = 32 MiB); store and retrieve chunks, timed "
            "against a memmove of the same bytes on --copy-threads threads; time lookups of a "
            "--lookup-chunks prompt against echoes of a message as large (one client, then "
            "--clients processes, with the server's CPU time per lookup); read the server's "
            "event-loop lag p99 while it copies; count L1's Python bytes per chunk; and, if "
            "redis-server is on PATH, time as many clients asking it EXISTS of as many keys. "
            "One untimed warm-up round of copies, and untimed warm-up lookups, run first. "
            "Progress goes to stderr; figures that miss their target are listed in `missed`."
        ),
    )
    cpu.add_argument("--json", action="store_true", help="print one JSON object")
    cpu.add_argument("--chunks", type=int, default=16, help="chunks stored per round (default 16)")
    cpu.add_argument("--prompt-chunks", type=int, default=4, help="chunks per prompt/request (default 4)")
    cpu.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed rounds after one untimed warm-up; the best is reported (default 3)",
    )
    cpu.add_argument("--layers", type=int, default=32, help="model layers (default 32)")
    cpu.add_argument("--lookups", type=int, default=2000, help="lookups timed (default 2000)")
    cpu.add_argument(
        "--lookup-chunks", type=int, default=16, help="chunks of the looked-up prompt (default 16)"
    )
    cpu.add_argument("--clients", type=int, default=16, help="client processes for throughput (default 16)")
    cpu.add_argument(
        "--load-seconds", type=float, default=3.0, help="seconds each throughput load runs (default 3)"
    )
    cpu.add_argument(
        "--copy-threads", type=int, default=2, help="the server's copy_threads and the memmove's (default 2)"
    )
    cpu.add_argument(
        "--metadata-chunks",
        type=int,
        default=100_000,
        help="L1 chunks for the metadata count (default 100000)",
    )
    cpu.add_argument(
        "--plain-file",
        action="store_true",
        help="a plain file under /dev/shm (copied with preadv/pwritev) instead of a sealed memfd",
    )
    for module in _bench_modules().values():
        module.add_parser(bench_sub)


# The optional dependencies and the extra that installs each: a command that needs one that is
# missing says which extra to install instead of failing with a traceback.
EXTRA_OF = {
    "hypercorn": "server",
    "prometheus_client": "server",
    "xxhash": "server",
    "boto3": "s3",
    "botocore": "s3",
    "cuda": "cuda",
}


def missing_extra(exc: BaseException) -> str | None:
    """The extra whose absence ``exc`` (maybe inside Trio's exception groups) reports, if any."""
    exc = single_cause(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return EXTRA_OF.get(exc.name.split(".")[0])
    return None


class _NeedsExtra:
    """Stands in for a bench module whose dependencies are not installed: the subcommand is
    listed (and says what to install) instead of breaking ``trio-kv --help``."""

    def __init__(self, name: str, error: ModuleNotFoundError) -> None:
        self.name = name
        self.error = error

    def add_parser(self, sub: Any) -> None:
        extra = missing_extra(self.error) or "test"
        sub.add_parser(self.name, help=f"(not installed: pip install 'trio-kv[{extra}]')")

    def main(self, args: argparse.Namespace) -> int:
        raise self.error


def _bench_modules() -> dict[str, Any]:
    """``trio-kv bench`` subcommands beyond cpu, each a module with add_parser() and main()."""
    modules: dict[str, Any] = {}
    for name in ("fs", "s3", "gpu", "soak", "vllm", "scaling"):
        try:
            modules[name] = importlib.import_module(f"{__package__}.tools.bench_{name}")
        except ModuleNotFoundError as exc:
            if missing_extra(exc) is None:
                raise
            modules[name] = _NeedsExtra(name, exc)
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-kv", description="trio-kv: a KV-cache server for LLM inference."
    )
    parser.add_argument("--version", action="version", version=f"trio-kv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _ping_parser(sub)
    _bench_parser(sub)
    admin_cli.add_parsers(sub)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


async def _serve_until_signal(config: ServerConfig, config_path: str | None) -> None:
    from .server.process import Server

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(Server(config, config_path=config_path).serve)
            # What the start made (imports, the engine, the arena's views) lives as long as the
            # process: frozen, no full collection walks it again (a served process holds ~205 k
            # tracked objects: 54-70 ms of the loop per full collection; after: ~0).
            gc.collect()
            gc.freeze()
            async for signum in signals:
                log.info("received %s: draining", signal.Signals(signum).name)
                await server.shutdown()
                break


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {
        "listen": args.listen,
        "l1_size": args.l1_size,
        "chunk_size": args.chunk_size,
        "log_level": args.log_level,
        "workers": args.workers,
        "request_timeout_s": args.request_timeout_s,
        "lease_ttl_s": args.lease_ttl_s,
        "shm_dir": args.shm_dir,
        "transfer": args.transfer,
        "l2": args.l2,
        "admin": args.admin,
        "no_admin": args.no_admin,
        "admin_token": args.admin_token,
    }
    try:
        config = load_config(path=args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"trio-kv serve: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_json(config))
        return 0
    from .nt_stores import active_threshold, exec_with_threshold

    exec_with_threshold(config.copy_nt_threshold)  # returns only where nothing is to be done
    _configure_logging(config.log_level)
    if streaming := active_threshold():
        log.info("copies of %d bytes or more use non-temporal stores (GLIBC_TUNABLES)", streaming)
    from .server.transport import set_nng_task_threads

    set_nng_task_threads(config.nng_task_threads)  # before the first socket starts nng
    try:
        trio.run(_serve_until_signal, config, args.config or os.environ.get("TRIO_KV_CONFIG"))
    except BaseException as exc:
        failure = _startup_failure(exc)
        if failure is None:
            raise
        print(f"trio-kv serve: {failure}", file=sys.stderr)
        return 2 if isinstance(failure, ConfigError) else 1
    log.info("stopped")
    return 0


def _startup_failure(exc: BaseException) -> BaseException | None:
    """The RuntimeError/OSError a failed start raised (a socket in use, an admin port taken),
    or the ConfigError of a setting found wrong only at start (an S3 bucket that does not
    exist), unwrapped from the Trio exception groups it travelled in; None for anything else."""
    exc = single_cause(exc)
    return exc if isinstance(exc, (RuntimeError, OSError, ConfigError)) else None


def cmd_ping(args: argparse.Namespace) -> int:
    import os

    from .client import BlockingClient

    url = args.url or os.environ.get("TRIO_KV_URL") or DEFAULT_LISTEN
    try:
        token = os.environ.get("TRIO_KV_DATA_TOKEN", "")  # what a tcp:// listener needs
        with BlockingClient.connect(url, timeout_s=args.timeout, token=token) as client:
            client.ping()
            hello = client.hello
    except Exception as exc:
        print(f"trio-kv ping: {url}: {exc}", file=sys.stderr)
        return 1
    assert hello is not None
    print(
        f"ok: trio-kv {hello.server_version} at {url} (protocol {hello.protocol_version}, "
        f"chunk {hello.chunk_size} tokens)"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _bench_with_nt_stores()
    module = _bench_modules().get(args.bench)
    if module is not None:
        return int(module.main(args))
    from .tools import bench_cpu

    return bench_cpu.main(args)


def _bench_with_nt_stores() -> None:
    """A bench runs with the non-temporal threshold ``trio-kv serve`` would use (read as serve
    reads its settings), so its references (a memmove of the same bytes) copy the way the
    servers it starts do: they inherit its ``GLIBC_TUNABLES`` unchanged."""
    from .nt_stores import DEFAULT_THRESHOLD, exec_with_threshold

    try:
        threshold = load_config().copy_nt_threshold
    except ConfigError:
        threshold = DEFAULT_THRESHOLD  # a server the bench starts refuses the setting and says why
    exec_with_threshold(threshold)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"serve": cmd_serve, "ping": cmd_ping, "bench": cmd_bench, **admin_cli.COMMANDS}
    try:
        return commands[args.command](args)
    except BaseException as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        print(
            f"trio-kv {args.command}: {single_cause(exc)}; install it with: pip install 'trio-kv[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
