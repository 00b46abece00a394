"""Put vLLM's CPU KV cache in shared memory the server can map. No vLLM import.

vLLM's CPU worker allocates its whole KV cache as one flat
``torch.zeros(n, dtype=torch.int8)`` and hands the connector views of it. The
worker enters the connector's ``get_mem_pool_context()`` around that
allocation; ``SharedKVAllocation`` is that context: a torch function mode that
turns each flat int8/uint8 CPU ``torch.zeros`` inside it into a zeroed sealed
memfd (``trio_kv.export.memfd``), which the server maps by path and which cannot
shrink under it. Anything else is allocated as usual; if vLLM's allocation
ever looks different, the tensors are not in a region and the worker falls
back to staging (``staging.StagingMirror``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..export.memfd import SealedRegion, create_sealed_region
from .registration import FileMapping

log = logging.getLogger("trio_kv.vllm")

_BYTE_DTYPES = (torch.int8, torch.uint8)
_PLAIN_KWARGS = {"dtype", "device", "layout", "requires_grad", "pin_memory"}


class SharedKVAllocation(TorchFunctionMode):
    """A context in which vLLM's flat CPU KV allocation lands in sealed shared memory.

    ``regions`` holds every region made inside it; ``close`` closes their
    descriptors (the memory stays mapped while vLLM's tensors live).
    """

    def __init__(self) -> None:
        super().__init__()
        self.regions: list[SealedRegion] = []

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        nbytes = _flat_cpu_bytes(func, args, kwargs)
        if nbytes is None:
            return func(*args, **kwargs)
        region = create_sealed_region(nbytes, name="trio-kv-vllm-kv")
        self.regions.append(region)
        log.info("trio-kv: vLLM's CPU KV cache (%d bytes) is in sealed shared memory %s", nbytes, region.path)
        dtype = kwargs.get("dtype") or torch.int8
        return region.tensor if dtype == torch.int8 else region.tensor.view(dtype)

    def mappings(self) -> list[FileMapping]:
        """The regions as file mappings, for ``registration.kv_cache_registration``."""
        return [
            FileMapping(
                region.tensor.data_ptr(), region.tensor.data_ptr() + region.nbytes, 0, True, region.path
            )
            for region in self.regions
            if region.fd >= 0
        ]

    def close(self) -> None:
        for region in self.regions:
            region.close()


def _flat_cpu_bytes(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """The size of a ``torch.zeros(n, dtype=int8|uint8)`` on the CPU, or None for any other call."""
    if func is not torch.zeros or set(kwargs) - _PLAIN_KWARGS:
        return None
    if kwargs.get("dtype") not in _BYTE_DTYPES or kwargs.get("requires_grad") or kwargs.get("pin_memory"):
        return None
    if kwargs.get("layout") not in (None, torch.strided):
        return None
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return None
    size: Any = args[0] if len(args) == 1 else None
    if isinstance(size, (tuple, list, torch.Size)):
        size = size[0] if len(size) == 1 else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return None
    return size
