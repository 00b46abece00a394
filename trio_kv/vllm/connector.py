"""``TrioKVConnector``: the vLLM ``KVConnectorBase_V1`` subclass. Imports vLLM.

A thin adapter: it reads vLLM's config and objects and delegates to
``SchedulerLogic`` (scheduler role) or ``WorkerLogic`` (worker role), which do
not import vLLM.

Interface checked against vLLM 0.33.0
(``vllm/distributed/kv_transfer/kv_connector/v1/base.py``): abstract methods
start_load_kv, wait_for_layer_load, save_kv_layer, wait_for_save,
get_num_new_matched_tokens, update_state_after_alloc, build_connector_meta;
overridden defaults handle_preemptions, register_kv_caches, get_finished (which
the default get_transfer_results wraps), get_block_ids_with_load_errors,
request_finished, shutdown, requires_kv_delivery and supports_sleep_mode.
``SchedulerOutput``/``CachedRequestData`` are read as in that release
(``translate``), with older releases' ``resumed_from_preemption`` also accepted.

Load it with::

    --kv-transfer-config '{"kv_connector": "TrioKVConnector",
        "kv_connector_module_path": "trio_kv.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"trio_kv.url": "ipc:///tmp/trio-kv.sock"}}'
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .config import config_from_extra
from .deltas import CounterDeltas
from .metadata import StepPlan
from .scheduler import SchedulerLogic
from .shared_alloc import SharedKVAllocation
from .stats import TrioKVConnectorStats
from .translate import HYBRID_NOT_SUPPORTED, scheduler_step, single_group
from .worker import WorkerLogic

if TYPE_CHECKING:
    import torch

__all__ = ["TrioKVConnector", "TrioKVConnectorMetadata"]


def _host_hit_source() -> Any:
    """The label of hits from host memory in vLLM's prefix-cache metrics (None before vLLM had one)."""
    try:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource
    except ImportError:
        return None
    return CacheHitSource.HOST


_HOST_HIT_SOURCE = _host_hit_source()


class TrioKVConnectorMetadata(KVConnectorMetadata):
    """One step's plan, carried from the scheduler process to every worker."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class TrioKVConnector(KVConnectorBase_V1):
    """vLLM KV connector for a trio-kv server (CUDA IPC on GPU, shared memory on the CPU path)."""

    if _HOST_HIT_SOURCE is not None:
        _cache_hit_source = _HOST_HIT_SOURCE  # hits come out of the server's CPU memory

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer_config = vllm_config.kv_transfer_config
        config = config_from_extra(transfer_config.kv_connector_extra_config)
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or ()
        if len(groups) > 1:
            raise ValueError(HYBRID_NOT_SUPPORTED)
        parallel = vllm_config.parallel_config
        for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
            if getattr(parallel, name, 1) > 1:
                raise ValueError(f"trio-kv does not support context parallelism ({name} > 1)")
        # One object key per KV shard: tensor- and pipeline-parallel ranks hold different shards,
        # data-parallel replicas hold the same ones.
        world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        model = config.model_name or vllm_config.model_config.model
        block_size = groups[0].kv_cache_spec.block_size if groups else vllm_config.cache_config.block_size
        self._num_blocks = (
            getattr(kv_cache_config, "num_blocks", None) or vllm_config.cache_config.num_gpu_blocks
        )
        self._scheduler: SchedulerLogic | None = None
        self._worker: WorkerLogic | None = None
        self._allocation: SharedKVAllocation | None = None
        self._stat_deltas = CounterDeltas()
        if role == KVConnectorRole.SCHEDULER:
            kv_role = transfer_config.kv_role or "kv_both"
            self._scheduler = SchedulerLogic.connect(
                config,
                model=model,
                world_size=world_size,
                block_size=block_size,
                load=kv_role in ("kv_consumer", "kv_both"),
                save=kv_role in ("kv_producer", "kv_both"),
            )
        else:
            rank = _worker_rank()
            self._worker = WorkerLogic.connect(
                config,
                world_size=world_size,
                rank=rank,
                block_size=block_size,
                instance_id=f"vllm-{socket.gethostname()}-{os.getpid()}-rank{rank}",
            )
            device_config = getattr(vllm_config, "device_config", None)
            if getattr(device_config, "device_type", "") == "cpu":
                # vLLM's CPU KV cache is private memory unless allocated inside our context.
                self._allocation = SharedKVAllocation()

    # ------------------------------------------------------------ capabilities

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save lost to a preemption is only a future miss

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        return False  # sleep mode remaps the KV cache; a CUDA IPC registration would go stale

    # ------------------------------------------------------------ worker side

    def get_mem_pool_context(self) -> SharedKVAllocation | None:
        """On the CPU: the context vLLM allocates its KV cache in, so it lands in shared memory."""
        return self._allocation

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        shared = self._allocation.mappings() if self._allocation is not None else []
        self._worker_logic().register_kv_caches(kv_caches, num_blocks=self._num_blocks, shared=shared or None)

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        # vLLM passes this step's connector metadata (older releases: the preempted request ids).
        if isinstance(kv_connector_metadata, TrioKVConnectorMetadata):
            request_ids: Any = kv_connector_metadata.plan.preempted_req_ids
        elif isinstance(kv_connector_metadata, (set, frozenset, list, tuple)):
            request_ids = kv_connector_metadata
        else:
            request_ids = ()
        self._worker_logic().handle_preemptions(request_ids)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker_logic().start_load_kv(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv returns only once this batch's loads are done

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # stores are whole chunks of every layer, submitted in wait_for_save

    def wait_for_save(self) -> None:
        self._worker_logic().wait_for_save(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker_logic().get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker_logic().get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> TrioKVConnectorStats | None:
        """What changed since the last call (worker: loads and stores; scheduler: lookups)."""
        logic = self._worker if self._worker is not None else self._scheduler
        delta = {} if logic is None else self._stat_deltas.since_last(logic.stats)
        return TrioKVConnectorStats(data=delta) if delta else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TrioKVConnectorStats:
        return TrioKVConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        if self._allocation is not None:
            self._allocation.close()
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    # ------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler_logic().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        block_ids = single_group(blocks.get_block_ids()) or []
        self._scheduler_logic().update_state_after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> TrioKVConnectorMetadata:
        plan = self._scheduler_logic().build_connector_meta(scheduler_step(scheduler_output))
        return TrioKVConnectorMetadata(plan)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler_logic().request_finished(request), None

    # ------------------------------------------------------------ helpers

    def _plan(self) -> StepPlan:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, TrioKVConnectorMetadata), type(metadata)
        return metadata.plan

    def _worker_logic(self) -> WorkerLogic:
        assert self._worker is not None, "a worker-side method was called on the scheduler-side connector"
        return self._worker

    def _scheduler_logic(self) -> SchedulerLogic:
        assert self._scheduler is not None, "a scheduler-side method was called on a worker-side connector"
        return self._scheduler


def _worker_rank() -> int:
    """This worker's shard: its pipeline stage times the tensor-parallel size, plus its TP rank."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    tp = get_tp_group()
    return get_pp_group().rank_in_group * tp.world_size + tp.rank_in_group
