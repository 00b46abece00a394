"""L2 adapters: where chunks go when they leave (or outlive) L1.

``base.L2Adapter`` is the interface; ``mock`` keeps objects in memory for tests;
``fs`` and ``s3`` are the real tiers.
"""

from .base import AdapterError, AdapterHealth, L2Adapter
from .mock import MockAdapter

__all__ = ["AdapterError", "AdapterHealth", "L2Adapter", "MockAdapter"]
