"""The circuit breaker of the S3 adapter, on a fake clock."""

import pytest

from trio_kv.adapters.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, changes: list[BreakerState] | None = None) -> CircuitBreaker:
    return CircuitBreaker(3, 5.0, clock, on_change=None if changes is None else changes.append)


def test_a_closed_breaker_lets_every_call_through(clock):
    breaker = make(clock)
    assert breaker.allow() and breaker.allow()
    assert not breaker.blocking()
    assert breaker.state is BreakerState.CLOSED


def test_it_opens_at_the_threshold_of_consecutive_failures_and_says_why(clock):
    breaker = make(clock)
    breaker.record_failure("refused")
    breaker.record_failure("refused")
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure("connection refused by 127.0.0.1")
    assert breaker.state is BreakerState.OPEN
    assert "3 consecutive connection failures" in breaker.reason
    assert "connection refused by 127.0.0.1" in breaker.reason
    assert breaker.blocking() and not breaker.allow()
    assert breaker.opened == 1


def test_a_success_resets_the_count_of_consecutive_failures(clock):
    breaker = make(clock)
    for _ in range(2):
        breaker.record_failure("refused")
    breaker.record_success()
    breaker.record_failure("refused")
    breaker.record_failure("refused")
    assert breaker.state is BreakerState.CLOSED


def test_after_the_cooldown_exactly_one_probe_goes_through(clock):
    breaker = make(clock)
    for _ in range(3):
        breaker.record_failure("refused")
    clock.now += 4.99
    assert not breaker.allow()
    clock.now += 0.01
    assert not breaker.blocking()  # asking does not take the probe
    assert breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.blocking() and not breaker.allow()  # the probe is out


def test_a_successful_probe_closes_the_breaker(clock):
    changes: list[BreakerState] = []
    breaker = make(clock, changes)
    for _ in range(3):
        breaker.record_failure("refused")
    clock.now += 5
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.reason == "" and breaker.consecutive_failures == 0
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_probe_opens_it_again_for_a_fresh_cooldown(clock):
    breaker = make(clock)
    for _ in range(3):
        breaker.record_failure("refused")
    clock.now += 5
    assert breaker.allow()
    breaker.record_failure("still refused")
    assert breaker.state is BreakerState.OPEN
    assert "still refused" in breaker.reason
    assert breaker.retry_at == clock.now + 5
    assert not breaker.allow()
    assert breaker.opened == 2


def test_a_probe_released_without_a_verdict_lets_the_next_caller_probe(clock):
    breaker = make(clock)
    for _ in range(3):
        breaker.record_failure("refused")
    clock.now += 5
    assert breaker.allow()
    breaker.release_probe()  # the probe was cancelled
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN


def test_late_failures_of_calls_sent_before_it_opened_do_not_extend_the_cooldown(clock):
    breaker = make(clock)
    for _ in range(3):
        breaker.record_failure("refused")
    retry_at = breaker.retry_at
    clock.now += 2
    breaker.record_failure("a slow call that was already out")
    assert breaker.retry_at == retry_at


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, -1.0)])
def test_nonsense_settings_are_refused(clock, threshold, cooldown):
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, cooldown, clock)


def test_a_trip_opens_at_once_and_a_failed_probe_trips_it_again(clock):
    changes: list[BreakerState] = []
    breaker = make(clock, changes)
    breaker.trip("bucket missing: 'kv' does not exist")
    assert breaker.state is BreakerState.OPEN and breaker.blocking()
    assert breaker.reason == "bucket missing: 'kv' does not exist"
    clock.now += 5.0
    assert breaker.allow()  # the probe
    breaker.trip("bucket missing: 'kv' does not exist")
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN]
    assert breaker.opened == 2 and breaker.retry_at == clock.now + 5.0
