"""``--l2 SPEC`` strings: parse, validate, and build the adapter they name.

    fs:/var/cache/trio-kv?capacity=500GiB&o_direct=true
    s3://my-bucket/kv/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&capacity=2TiB
    mock:?latency_ms=5&fail_rate=0.01          (in memory; for tests and experiments)

Options every kind takes: ``capacity`` (a size; turns LRU eviction on),
``high_watermark`` and ``low_watermark`` (fractions of capacity; eviction starts
above the first and stops at the second), ``threads`` (blocking calls at once).
Capacity and watermarks are the tier's policy, not the adapter's: ``build_adapter``
leaves them out and ``AdapterSpec.tier_options`` hands them to ``core.l2_tier``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec

from ..sizes import parse_size
from .base import L2Adapter

_COMMON: dict[str, Callable[[str], Any]] = {
    "capacity": parse_size,
    "high_watermark": float,
    "low_watermark": float,
    "threads": int,
}


_TIER_OPTIONS = ("capacity", "high_watermark", "low_watermark")


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


_OPTIONS: dict[str, dict[str, Callable[[str], Any]]] = {
    "fs": {**_COMMON, "o_direct": _bool, "create": _bool},
    "s3": {
        **_COMMON,
        "endpoint": str,
        "region": str,
        "breaker_failures": int,
        "breaker_cooldown_s": float,
        "max_retries": int,
    },
    "mock": {**_COMMON, "latency_ms": float, "bandwidth_mbps": float, "fail_rate": float},
}


class AdapterSpec(msgspec.Struct, frozen=True):
    kind: str
    location: str  # fs: directory; s3: bucket[/prefix]; mock: a name
    options: dict[str, Any]
    text: str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.location}" if self.location else self.kind

    def tier_options(self) -> dict[str, Any]:
        """The options that belong to the tier: capacity and watermarks, where given."""
        return {k: self.options[k] for k in _TIER_OPTIONS if k in self.options}


def parse_spec(text: str) -> AdapterSpec:
    """Parse one spec; raises ValueError saying what is wrong."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in _OPTIONS:
        raise ValueError(f"L2 spec {text!r}: must start with one of {', '.join(k + ':' for k in _OPTIONS)}")
    if kind == "s3":
        parts = urlsplit(text)
        if not parts.netloc:
            raise ValueError(f"L2 spec {text!r}: expected s3://BUCKET[/PREFIX][?options]")
        location = parts.netloc + parts.path.rstrip("/")
        query = parts.query
    else:
        location, _, query = rest.partition("?")
        if kind == "fs":
            if not location:
                raise ValueError(f"L2 spec {text!r}: expected fs:DIRECTORY[?options]")
            location = os.path.abspath(location)
    allowed = _OPTIONS[kind]
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if name not in allowed:
            raise ValueError(
                f"L2 spec {text!r}: unknown option {name!r}; {kind} takes {', '.join(sorted(allowed))}"
            )
        try:
            options[name] = allowed[name](value)
        except ValueError as exc:
            raise ValueError(f"L2 spec {text!r}: option {name}: {exc}") from None
    return AdapterSpec(kind=kind, location=location, options=options, text=text)


def build_adapter(spec: AdapterSpec) -> L2Adapter:
    """Construct the adapter a spec names (imports its module only now); the tier's
    options (``tier_options``) are left out."""
    options = {k: v for k, v in spec.options.items() if k not in _TIER_OPTIONS}
    common: dict[str, Any] = {"name": spec.name}
    if "threads" in options:
        common["max_threads"] = options.pop("threads")
    if spec.kind == "fs":
        from .fs import FsAdapter

        return FsAdapter(
            spec.location,
            o_direct=options.get("o_direct", False),
            create=options.get("create", False),
            **common,
        )
    if spec.kind == "s3":
        from .s3 import S3Adapter

        bucket, _, prefix = spec.location.partition("/")
        return S3Adapter(
            bucket,
            prefix=f"{prefix}/" if prefix else "",
            endpoint_url=options.pop("endpoint", None),
            region=options.pop("region", None),
            **options,
            **common,
        )
    from .mock import MockAdapter

    return MockAdapter(
        latency_s=options.get("latency_ms", 0.0) / 1000,
        bandwidth_bps=options.get("bandwidth_mbps", 0.0) * 1e6,
        fail_rate=options.get("fail_rate", 0.0),
        **common,
    )
