"""What L1 holds in Python objects per cached chunk (``metadata_bytes_per_chunk``).

The bench fills a bare ``L1Store`` with ``chunks`` committed entries, made the way a store
makes them (an ``ObjectKey`` with a 16-byte chained hash, a reservation, a commit, the
cache's layout fingerprint), and counts the Python memory they take with tracemalloc: the
entry, its key and hash, its offset, the store's index and eviction order, the allocator's
and ledger's records. The hashes are made before counting starts (their size is added
back: a store keeps one per chunk). tracemalloc counts the bytes each object asks for, not
pymalloc's rounding of them to 8 or 16 bytes. The arena itself (one torch buffer, never
touched here) is not Python memory and is not counted.
"""

from __future__ import annotations

import gc
import hashlib
import tracemalloc

from ..core.l1 import Entry, L1Store
from ..keys import HASH_BYTES, ObjectKey

ALIGNMENT = 4096


def metadata_bytes_per_chunk(chunks: int, *, model: str = "bench/llama-3-8b") -> float:
    """Python bytes per committed chunk in an L1 holding ``chunks`` of them."""
    store = L1Store(chunks * ALIGNMENT, high_watermark=1.0, low_watermark=1.0, alignment=ALIGNMENT)
    hashes = [
        hashlib.blake2b(n.to_bytes(8, "little"), digest_size=HASH_BYTES).digest() for n in range(chunks)
    ]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for chunk_hash in hashes:
            entry = store.reserve(ObjectKey(model, 1, 0, chunk_hash), ALIGNMENT)
            assert isinstance(entry, Entry), entry
            entry.layout = "bench-layout"
            store.commit(entry)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # The hashes were made before counting; a real store makes (and keeps) one per chunk.
    return (after - before) / chunks + hashes[0].__sizeof__()
