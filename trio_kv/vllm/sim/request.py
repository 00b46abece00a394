"""The requests of the simulated engine (``simulator``): what the connector reads of vLLM's
``Request``, plus what tests read, and a counter an idle engine waits on."""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence


class Status(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_ABORTED = "finished_aborted"


class SimRequest:
    """A request as the connector sees vLLM's (``request_id``, ``all_token_ids``, ``cache_salt``),
    plus what the tests read: where its KV came from."""

    def __init__(
        self, request_id: str, prompt: Sequence[int], max_new_tokens: int, cache_salt: str | None
    ) -> None:
        self.request_id = request_id
        self.cache_salt = cache_salt
        self.all_token_ids = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.prefix_hashes: list[int] = []
        self.verified_until: list[int] = []  # per rank: positions checked or written since admission
        self.local_hit_tokens = 0  # vLLM's prefix-cache hit at the last admission
        self.external_tokens = 0  # tokens trio-kv was to load, over all admissions
        self.computed_tokens = 0  # tokens the forward pass computed, over all admissions
        self.load_errors = 0  # steps in which some of its blocks were reported unfilled
        self.preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status in (Status.FINISHED_STOPPED, Status.FINISHED_ABORTED)


class Progress:
    """Counts finished background calls, so an idle engine waits for one instead of spinning."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.count = 0

    def notify(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_beyond(self, count: int, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count > count, timeout=timeout_s)
