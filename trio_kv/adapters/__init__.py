"""L2 adapters: where chunks go when they leave (or outlive) L1.

``base.L2Adapter`` is the interface (pure I/O; the ledger, pins, quotas and eviction
live in ``core.l2_tier``); ``mock`` keeps objects in memory for tests; ``fs`` and
``s3`` are the real stores.
"""

from .base import AdapterError, AdapterHealth, L2Adapter, StoreMissing, Unavailable
from .mock import MockAdapter

__all__ = ["AdapterError", "AdapterHealth", "L2Adapter", "MockAdapter", "StoreMissing", "Unavailable"]
