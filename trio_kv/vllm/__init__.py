"""The vLLM connector for trio-kv.

vLLM loads it with ``"kv_connector": "TrioKVConnector", "kv_connector_module_path":
"trio_kv.vllm"``. Importing this package does not import vLLM: ``TrioKVConnector``
is resolved on first access, so trio-kv and its tests work without vLLM installed.

- ``scheduler.SchedulerLogic`` and ``worker.WorkerLogic``: the connector's logic (no vLLM import),
  with ``request_state``, ``background``, ``connection`` and ``registration`` under them
- ``config``: the ``trio_kv.*`` keys of ``kv_connector_extra_config``
- ``metadata``: the plans the scheduler side sends to workers each step
- ``translate``: reads vLLM's ``SchedulerOutput`` without importing vLLM
- ``connector.TrioKVConnector``: the thin ``KVConnectorBase_V1`` subclass (imports vLLM)
- ``simulator`` (with ``sim_*``) and ``testing``: a vLLM-shaped engine that drives the logic
  in vLLM's call order against a real server (for tests)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connector import TrioKVConnector, TrioKVConnectorMetadata

__all__ = ["TrioKVConnector", "TrioKVConnectorMetadata"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        try:
            from . import connector
        except ImportError as exc:
            raise ImportError(
                f"trio_kv.vllm.{name} needs vLLM, which could not be imported ({exc}); "
                "install vLLM in the same environment as trio-kv"
            ) from exc
        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
