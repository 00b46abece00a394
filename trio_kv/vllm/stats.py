"""trio-kv's counters in vLLM's connector stats (its ``KV Transfer metrics`` log line). Imports vLLM.

The worker and the scheduler each report what changed since their last report;
vLLM sums the workers' reports with the scheduler's (``aggregate``) and logs the
sum of an interval (``reduce``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


@dataclass
class TrioKVConnectorStats(KVConnectorStats):
    """Counter deltas by name (``chunks_loaded``, ``lookup_hit_tokens``, ...)."""

    def reset(self) -> None:
        self.data: dict[str, int] = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {f"trio_kv_{name}": value for name, value in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())
