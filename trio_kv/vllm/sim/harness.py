"""Test harness: a simulated vLLM engine wired to a trio-kv server (see ``simulator``).

Everything here blocks, so a Trio test that runs the server in its own loop
calls it from a thread::

    async with running_server(chunk_size=32) as server:
        def scenario():
            with simulated_engine(server.url) as engine:
                engine.add_request("a", prompt)
                engine.run()
        await trio.to_thread.run_sync(scenario)
        assert_no_leaks(server)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ...export.shm import SharedKVCache, create_shared_kv_cache
from ..background import BackgroundCalls
from ..config import ConnectorConfig
from ..connection import connect
from ..scheduler import SchedulerLogic
from ..worker import WorkerLogic
from .simulator import Progress, SimEngine


@contextlib.contextmanager
def simulated_engine(
    url: str,
    *,
    model: str = "sim-model",
    world_size: int = 1,
    num_blocks: int = 64,
    block_size: int = 16,
    num_layers: int = 2,
    num_kv_heads: int = 2,
    head_size: int = 32,
    async_load: bool = True,
    prefix_caching: bool = True,
    max_num_batched_tokens: int = 2048,
    stores_within_step: bool = False,
    threads: int = 4,
) -> Iterator[SimEngine]:
    """A SimEngine with one scheduler-side and ``world_size`` worker-side connectors.

    On exit every background call has finished (EndSession included), the KV
    caches are unregistered and their shared-memory files removed.
    """
    progress = Progress()
    config = ConnectorConfig(url=url, timeout_s=10.0, connect_timeout_s=0.0, threads=threads)

    def calls(name: str) -> BackgroundCalls:
        client = connect(config, client_name=name)
        return BackgroundCalls(client, threads=threads, name=name, on_complete=progress.notify)

    with contextlib.ExitStack() as stack:
        caches: list[SharedKVCache] = [
            stack.enter_context(
                create_shared_kv_cache(
                    num_blocks=num_blocks,
                    block_size=block_size,
                    num_layers=num_layers,
                    num_kv_heads=num_kv_heads,
                    head_size=head_size,
                    fill="zeros",
                )
            )
            for _ in range(world_size)
        ]
        scheduler = SchedulerLogic(
            calls("sim-scheduler"),
            model=model,
            world_size=world_size,
            block_size=block_size,
            async_load=async_load,
        )
        stack.callback(scheduler.close)
        workers = []
        for rank in range(world_size):
            worker = WorkerLogic(
                calls(f"sim-worker-{rank}"),
                world_size=world_size,
                rank=rank,
                block_size=block_size,
                instance_id=f"sim-{id(caches[rank]):x}-rank{rank}",
            )
            stack.callback(worker.shutdown)
            workers.append(worker)
        yield SimEngine(
            scheduler,
            workers,
            caches,
            progress=progress,
            prefix_caching=prefix_caching,
            max_num_batched_tokens=max_num_batched_tokens,
            stores_within_step=stores_within_step,
        )
