"""Object names in L2: one versioned, reversible codec from ObjectKey to a relative path.

    v1/s_<salt>/m_<model>/<world_size>x<rank>/<hash[:2]>/<hash>

* Salt and model are percent-encoded (``urllib.parse.quote`` with nothing safe
  but ``A-Za-z0-9_.-~``), so any string round-trips and none can inject a ``/``.
* The salt comes first, so one tenant's objects are one prefix (``salt_prefix``)
  that lists and purges cheaply on a filesystem and in S3.
* A component that would pass ``MAX_COMPONENT`` characters is replaced by a
  digest (``sd_<hex>`` / ``md_<hex>``). Such names cannot give the key back, so
  adapters also store the full key beside the payload (``encode_key_record``)
  and read it back when ``parse_name`` says the name is a digest name.
* The chunk hash's first byte shards objects over 256 directories.
* The key record also carries the fingerprint of the KV layout that stored the
  payload (appended; records written before it decode with "", records with it
  decode in older readers, which ignore trailing fields). It is not in the name:
  lookups, which name no KV cache, must find an object whatever its layout.

A future ``v2`` must keep ``parse_name`` reading ``v1`` names.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote, unquote

import msgspec

from ..keys import HASH_BYTES, ObjectKey

VERSION = "v1"
MAX_COMPONENT = 200  # well under NAME_MAX (255) with room for prefixes
_HEX_HASH = re.compile(rf"^[0-9a-f]{{{2 * HASH_BYTES}}}$")
_RANKS = re.compile(r"^([0-9]+)x([0-9]+)$")


class _KeyRecord(msgspec.Struct, array_like=True):
    model: str
    world_size: int
    rank: int
    chunk_hash: bytes
    cache_salt: str
    layout: str = ""


def _component(tag: str, text: str) -> str:
    encoded = quote(text, safe="")
    if len(encoded) + len(tag) + 2 <= MAX_COMPONENT:
        return f"{tag}_{encoded}"
    digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return f"{tag}d_{digest}"


def salt_prefix(salt: str) -> str:
    """The name prefix (ending in '/') under which every object of one salt lives."""
    return f"{VERSION}/{_component('s', salt)}/"


def object_name(key: ObjectKey) -> str:
    digest = key.chunk_hash.hex()
    return (
        f"{salt_prefix(key.cache_salt)}{_component('m', key.model)}/"
        f"{key.world_size}x{key.rank}/{digest[:2]}/{digest}"
    )


class ParsedName(msgspec.Struct, frozen=True):
    """What a name says. ``key`` is None for digest names (read the stored key record)."""

    key: ObjectKey | None
    digest_named: bool


def parse_name(name: str) -> ParsedName | None:
    """Parse a name written by ``object_name``; None for anything else (foreign files)."""
    parts = name.split("/")
    if len(parts) != 6 or parts[0] != VERSION:
        return None
    salt_part, model_part, ranks, shard, digest = parts[1:]
    match = _RANKS.match(ranks)
    if match is None or not _HEX_HASH.match(digest) or shard != digest[:2]:
        return None
    world_size, rank = int(match.group(1)), int(match.group(2))
    if world_size < 1 or rank >= world_size:
        return None
    if salt_part.startswith("sd_") or model_part.startswith("md_"):
        return ParsedName(key=None, digest_named=True)
    if not (salt_part.startswith("s_") and model_part.startswith("m_")):
        return None
    key = ObjectKey(unquote(model_part[2:]), world_size, rank, bytes.fromhex(digest), unquote(salt_part[2:]))
    return ParsedName(key=key, digest_named=False)


def encode_key_record(key: ObjectKey, layout: str = "") -> bytes:
    """The full key and the payload's layout fingerprint as bytes, stored beside the payload
    (file header, object metadata)."""
    return msgspec.msgpack.encode(
        _KeyRecord(key.model, key.world_size, key.rank, key.chunk_hash, key.cache_salt, layout)
    )


def record_layout(data: bytes) -> str:
    """The layout fingerprint a key record carries; "" if none (or not a key record)."""
    try:
        return msgspec.msgpack.decode(data, type=_KeyRecord).layout
    except msgspec.MsgspecError:
        return ""


def decode_key_record(data: bytes) -> ObjectKey:
    """Inverse of ``encode_key_record``; raises ValueError on anything else."""
    try:
        record = msgspec.msgpack.decode(data, type=_KeyRecord)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"not a key record: {exc}") from None
    return ObjectKey(record.model, record.world_size, record.rank, record.chunk_hash, record.cache_salt)
