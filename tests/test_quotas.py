"""QuotaBook: per-salt per-tier limits, defaults, validation, persistence."""

import json
import math

import pytest
import trio

from trio_kv.core.quotas import (
    DEFAULT_NAME,
    EMPTY_SALT_NAME,
    QuotaBook,
    QuotaError,
    parse_quota_bytes,
    salt_from_url_name,
    salt_to_url_name,
)

TIERS = ["l1", "fs:/data"]


def test_a_salt_without_a_quota_falls_back_to_the_default_then_to_no_limit():
    book = QuotaBook(TIERS)
    assert book.limit("l1", "a") is None
    book.set(None, {"l1": 100})
    assert book.limit("l1", "a") == 100
    book.set("a", {"l1": 5})
    assert book.limit("l1", "a") == 5
    assert book.limit("fs:/data", "a") is None


def test_set_merges_tiers_and_delete_removes_one_or_all():
    book = QuotaBook(TIERS)
    book.set("a", {"l1": "1KiB"})
    assert book.set("a", {"fs:/data": 10}) == {"l1": 1024, "fs:/data": 10}
    assert book.delete("a", "l1")
    assert book.get("a") == {"fs:/data": 10}
    assert book.delete("a")
    assert not book.delete("a")
    assert book.all() == {}


@pytest.mark.parametrize(
    "value",
    [
        -1,
        math.nan,
        math.inf,
        "lots",
        1.5,
        True,
        None,
        [1],
        1e300,
        2**63,
        10**301,
        "99999999999999999999999",
        -1.0,
    ],
)
def test_invalid_values_are_refused_and_change_nothing(value):
    book = QuotaBook(TIERS)
    with pytest.raises(QuotaError):
        book.set("a", {"l1": 10, "fs:/data": value})
    assert book.get("a") == {}


def test_unknown_tiers_and_bad_salts_are_refused():
    book = QuotaBook(TIERS)
    with pytest.raises(QuotaError, match="unknown tier"):
        book.set("a", {"s3://elsewhere": 1})
    with pytest.raises(QuotaError, match="must not contain"):
        book.set("a/b", {"l1": 1})
    with pytest.raises(QuotaError):
        book.set("a", {})


def test_url_names_for_the_empty_salt_and_the_default():
    assert salt_from_url_name(EMPTY_SALT_NAME) == ""
    assert salt_from_url_name(DEFAULT_NAME) is None
    assert salt_from_url_name("tenant-7") == "tenant-7"
    assert [salt_to_url_name(s) for s in ("", None, "x")] == [EMPTY_SALT_NAME, DEFAULT_NAME, "x"]
    with pytest.raises(QuotaError):
        salt_from_url_name("a@b")


def test_quotas_survive_a_restart_through_the_state_file(tmp_path):
    path = str(tmp_path / "state" / "quotas.json")
    book = QuotaBook(TIERS, path)
    book.set("", {"l1": 7})
    book.set(None, {"fs:/data": 9})
    book.set("t", {"l1": 3})
    assert book.unsaved
    book.save_now()
    assert not book.unsaved
    again = QuotaBook(TIERS, path)
    assert again.all() == book.all()
    assert json.loads((tmp_path / "state" / "quotas.json").read_text())["version"] == 1


def test_a_corrupt_state_file_is_a_clear_error(tmp_path):
    path = tmp_path / "quotas.json"
    path.write_text("{not json")
    with pytest.raises(QuotaError, match="cannot read quota state"):
        QuotaBook(TIERS, str(path))


def test_listeners_hear_every_change():
    book = QuotaBook(TIERS)
    changes = []
    book.add_listener(lambda: changes.append(book.all()))
    book.set("a", {"l1": 1})
    book.delete("a")
    assert changes == [{"a": {"l1": 1}}, {}]


def test_a_quota_may_be_as_large_as_a_signed_64_bit_count_and_no_larger():
    assert parse_quota_bytes(2**63 - 1) == 2**63 - 1
    with pytest.raises(QuotaError, match="at most 9223372036854775807"):
        parse_quota_bytes(2**63)


def test_parse_quota_bytes_accepts_sizes_and_integral_numbers():
    assert parse_quota_bytes("2GiB") == 2 * 1024**3
    assert parse_quota_bytes(10.0) == 10
    assert parse_quota_bytes(0) == 0


async def test_save_writes_only_when_something_changed(tmp_path):
    path = tmp_path / "quotas.json"
    book = QuotaBook(TIERS, str(path))
    await book.save()
    assert not path.exists()  # nothing changed: nothing written
    book.set("t", {"l1": 3})
    await book.save()
    assert json.loads(path.read_text())["quotas"] == {"t": {"l1": 3}}
    path.unlink()
    await book.save()
    assert not path.exists()  # already saved


async def test_concurrent_saves_leave_the_newest_state(tmp_path):
    path = tmp_path / "quotas.json"
    book = QuotaBook(TIERS, str(path))
    async with trio.open_nursery() as nursery:
        for n in range(1, 6):
            book.set("t", {"l1": n})
            nursery.start_soon(book.save)
    assert json.loads(path.read_text())["quotas"] == {"t": {"l1": 5}}
    assert not book.unsaved


async def test_a_failed_save_keeps_the_change_unsaved(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    book = QuotaBook(TIERS, str(blocker / "quotas.json"))
    book.set("t", {"l1": 3})
    with pytest.raises(OSError):
        await book.save()
    assert book.unsaved and book.get("t") == {"l1": 3}


def test_a_book_without_a_file_never_has_unsaved_changes():
    book = QuotaBook(TIERS)
    book.set("t", {"l1": 3})
    assert not book.unsaved
