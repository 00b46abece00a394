"""Byte ledger: totals, per-salt buckets, clamping on over-release, usage snapshots, listeners."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_kv.core.ledger import AdapterUsage, ByteLedger, KeyedLedger
from trio_kv.keys import ObjectKey


def test_new_ledger_is_empty():
    ledger = ByteLedger(1000)
    assert ledger.total == 0
    assert dict(ledger.bytes_by_salt) == {}


def test_charges_add_to_the_total_and_to_their_salt():
    ledger = ByteLedger(1000)
    ledger.charge("a", 100)
    ledger.charge("b", 30)
    ledger.charge("a", 5)
    assert ledger.total == 135
    assert dict(ledger.bytes_by_salt) == {"a": 105, "b": 30}
    assert ledger.salt_bytes("a") == 105


def test_empty_salt_is_a_bucket_of_its_own():
    ledger = ByteLedger(None)
    ledger.charge("", 10)
    ledger.charge("a", 1)
    assert dict(ledger.bytes_by_salt) == {"": 10, "a": 1}


def test_release_subtracts_from_the_total_and_its_salt():
    ledger = ByteLedger(1000)
    ledger.charge("a", 100)
    ledger.charge("b", 50)
    ledger.release("a", 40)
    assert ledger.total == 110
    assert dict(ledger.bytes_by_salt) == {"a": 60, "b": 50}


def test_bucket_released_to_zero_is_dropped():
    ledger = ByteLedger(1000)
    ledger.charge("a", 100)
    ledger.charge("b", 1)
    ledger.release("a", 100)
    assert dict(ledger.bytes_by_salt) == {"b": 1}
    assert ledger.salt_bytes("a") == 0


def test_zero_charge_creates_no_bucket():
    ledger = ByteLedger(1000)
    ledger.charge("a", 0)
    assert dict(ledger.bytes_by_salt) == {}
    assert ledger.total == 0


def test_negative_amounts_are_rejected():
    ledger = ByteLedger(1000)
    ledger.charge("a", 10)
    with pytest.raises(ValueError):
        ledger.charge("a", -1)
    with pytest.raises(ValueError):
        ledger.release("a", -1)
    assert ledger.total == 10 and ledger.salt_bytes("a") == 10


def test_bytes_by_salt_is_read_only():
    ledger = ByteLedger(1000)
    ledger.charge("a", 10)
    with pytest.raises(TypeError):
        ledger.bytes_by_salt["a"] = 0  # type: ignore[index]
    with pytest.raises(TypeError):
        del ledger.bytes_by_salt["a"]  # type: ignore[attr-defined]
    assert ledger.salt_bytes("a") == 10


def test_usage_snapshot_does_not_change_with_the_ledger():
    ledger = ByteLedger(1000)
    ledger.charge("a", 10)
    usage = ledger.usage()
    ledger.charge("a", 10)
    usage.bytes_by_salt["b"] = 99
    assert usage.bytes_by_salt == {"a": 10, "b": 99}
    assert dict(ledger.bytes_by_salt) == {"a": 20}


def test_release_beyond_the_bucket_clamps_at_zero_and_warns(caplog):
    ledger = ByteLedger(1000)
    ledger.charge("a", 30)
    ledger.charge("b", 70)
    with caplog.at_level(logging.WARNING, logger="trio_kv.core.ledger"):
        ledger.release("a", 50)
    assert ledger.salt_bytes("a") == 0
    assert "a" not in ledger.bytes_by_salt
    assert ledger.total == 70  # other tenants' bytes are untouched
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_release_of_an_unknown_salt_changes_nothing_and_warns(caplog):
    ledger = ByteLedger(1000)
    ledger.charge("a", 30)
    with caplog.at_level(logging.WARNING, logger="trio_kv.core.ledger"):
        ledger.release("ghost", 10)
    assert ledger.total == 30
    assert dict(ledger.bytes_by_salt) == {"a": 30}
    assert len(caplog.records) == 1


def test_exact_release_does_not_warn(caplog):
    ledger = ByteLedger(1000)
    ledger.charge("a", 30)
    with caplog.at_level(logging.WARNING, logger="trio_kv.core.ledger"):
        ledger.release("a", 30)
    assert caplog.records == []
    assert ledger.total == 0


def test_usage_reports_total_capacity_buckets_and_fraction():
    ledger = ByteLedger(1000)
    ledger.charge("a", 200)
    ledger.charge("", 50)
    assert ledger.usage() == AdapterUsage(
        total_bytes_used=250,
        total_capacity_bytes=1000,
        bytes_by_salt={"a": 200, "": 50},
        usage_fraction=0.25,
    )


@pytest.mark.parametrize("capacity", [None, 0])
def test_usage_fraction_is_minus_one_without_a_capacity(capacity):
    ledger = ByteLedger(capacity)
    ledger.charge("a", 200)
    usage = ledger.usage()
    assert usage.usage_fraction == -1.0
    assert usage.total_capacity_bytes == capacity
    assert usage.total_bytes_used == 200


def test_reset_empties_everything():
    ledger = ByteLedger(1000)
    ledger.charge("a", 200)
    ledger.reset()
    assert ledger.total == 0 and dict(ledger.bytes_by_salt) == {}


def test_listeners_see_the_ledger_after_each_change():
    ledger = ByteLedger(1000)
    seen: list[tuple[int, dict[str, int]]] = []
    ledger.add_listener(lambda lg: seen.append((lg.total, dict(lg.bytes_by_salt))))
    ledger.charge("a", 100)
    ledger.charge("b", 20)
    ledger.release("a", 100)
    ledger.reset()
    assert seen == [(100, {"a": 100}), (120, {"a": 100, "b": 20}), (20, {"b": 20}), (0, {})]


def test_every_listener_is_called():
    ledger = ByteLedger(None)
    calls: list[str] = []
    ledger.add_listener(lambda _: calls.append("first"))
    ledger.add_listener(lambda _: calls.append("second"))
    ledger.charge("a", 1)
    assert calls == ["first", "second"]


def test_zero_byte_changes_do_not_notify():
    ledger = ByteLedger(None)
    calls: list[int] = []
    ledger.add_listener(lambda lg: calls.append(lg.total))
    ledger.charge("a", 0)
    ledger.release("a", 0)
    assert calls == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["charge", "release"]), st.sampled_from(["", "a", "b"]), st.integers(0, 100)
        ),
        max_size=40,
    )
)
def test_random_charges_and_releases_match_a_clamped_model(ops):
    ledger = ByteLedger(1000)
    model: dict[str, int] = {}
    for op, salt, amount in ops:
        if op == "charge":
            ledger.charge(salt, amount)
            model[salt] = model.get(salt, 0) + amount
        else:
            ledger.release(salt, amount)
            model[salt] = max(0, model.get(salt, 0) - amount)
        assert dict(ledger.bytes_by_salt) == {s: n for s, n in model.items() if n > 0}
        assert ledger.total == sum(model.values())
        assert ledger.usage().usage_fraction == ledger.total / 1000


# ---------------------------------------------------------------- KeyedLedger


def okey(n: int, salt: str = "") -> ObjectKey:
    return ObjectKey("m", 1, 0, n.to_bytes(16, "little"), salt)


def test_keyed_add_of_a_present_key_counts_zero_but_refreshes_recency():
    ledger = KeyedLedger(None)
    assert ledger.add([okey(1), okey(2)], [10, 20]) == 30
    assert ledger.add([okey(1)], [10]) == 0
    assert ledger.total == 30
    assert list(ledger.least_recent()) == [okey(2), okey(1)]


def test_keyed_add_with_unequal_keys_and_sizes_is_an_error():
    ledger = KeyedLedger(None)
    with pytest.raises(ValueError, match="2 keys but 1 sizes"):
        ledger.add([okey(1), okey(2)], [10])
    assert ledger.total == 0 and len(ledger) == 0


def test_keyed_remove_uses_the_recorded_size_and_ignores_unknown_keys():
    ledger = KeyedLedger(100)
    ledger.add([okey(1, "a"), okey(2, "b")], [10, 20])
    assert ledger.remove([okey(1, "a"), okey(9)]) == 10
    assert ledger.bytes_by_salt == {"b": 20}
    assert ledger.usage().usage_fraction == pytest.approx(0.2)


def test_keyed_listeners_hear_events_after_the_update():
    ledger = KeyedLedger(None)
    heard = []
    ledger.add_key_listener(lambda event, keys: heard.append((event, list(keys), ledger.total)))
    ledger.add([okey(1)], [5])
    ledger.add([okey(1)], [5])
    ledger.touch([okey(1), okey(2)])
    ledger.remove([okey(1)])
    assert heard == [
        ("add", [okey(1)], 5),
        ("touch", [okey(1)], 5),
        ("touch", [okey(1)], 5),
        ("remove", [okey(1)], 0),
    ]


def test_keyed_clear_forgets_everything():
    ledger = KeyedLedger(None)
    ledger.add([okey(1, "a")], [5])
    ledger.clear_keys()
    assert (ledger.total, len(ledger), dict(ledger.bytes_by_salt)) == (0, 0, {})
