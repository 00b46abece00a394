"""The fs adapter's file header: pure encode/decode and the checks readers make."""

import itertools
import random

import pytest

from trio_kv.adapters import codec, fs_format
from trio_kv.adapters.fs_format import ALIGN, HeaderError
from trio_kv.keys import ObjectKey

KEY = ObjectKey("llama", 2, 1, bytes(range(16)), "tenant")
RECORD = codec.encode_key_record(KEY)


def payload(size: int, seed: int = 0) -> memoryview:
    return memoryview(random.Random(seed).randbytes(size))


def test_a_header_round_trips_lengths_key_record_and_segment_checksums():
    data = payload(10_000)
    encoded = fs_format.encode_header(RECORD, data, segment_size=4096)
    header = fs_format.decode_header(encoded)
    assert len(encoded) == header.header_len == ALIGN
    assert header.payload_len == 10_000
    assert header.segment_size == 4096
    assert header.key_record == RECORD
    assert fs_format.stored_key(header) == KEY
    assert list(header.checksums) == [fs_format.checksum(data[lo : lo + 4096]) for lo in (0, 4096, 8192)]
    assert header.file_size == ALIGN + 10_000


def test_an_empty_payload_has_no_segments():
    header = fs_format.decode_header(fs_format.encode_header(RECORD, payload(0)))
    assert header.payload_len == 0
    assert header.checksums == ()


def test_a_long_key_record_still_fits_one_aligned_block():
    record = codec.encode_key_record(ObjectKey("m" * 300, 1, 0, bytes(16), "s" * 128))
    encoded = fs_format.encode_header(record, payload(32 * 1024 * 1024))
    assert len(encoded) == ALIGN
    assert fs_format.decode_header(encoded).key_record == record


def test_many_segments_grow_the_header_by_whole_aligned_blocks():
    encoded = fs_format.encode_header(RECORD, payload(600 * 64), segment_size=64)  # 600 checksums
    assert len(encoded) == 2 * ALIGN
    assert fs_format.header_length(encoded[: fs_format.FIXED_BYTES]) == 2 * ALIGN
    assert len(fs_format.decode_header(encoded).checksums) == 600


def test_checksums_must_match_the_payload_length():
    with pytest.raises(ValueError, match="checksums"):
        fs_format.encode_header_with(RECORD, 10_000, [1, 2], segment_size=4096)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"NOTOURS!" + b[8:], "magic"),
        (lambda b: b[:8] + (9).to_bytes(2, "little") + b[10:], "version"),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "checksum"),  # a flipped key record byte
        (lambda b: b[:12] + (3).to_bytes(4, "little") + b[16:], "header length"),
        (lambda b: b[:20], "too short"),
        (lambda b: b[:100], "only 100"),
    ],
    ids=["magic", "version", "flipped-byte", "bad-header-length", "short-prefix", "truncated"],
)
def test_foreign_or_damaged_headers_are_rejected_with_a_reason(mutate, reason):
    encoded = fs_format.encode_header(RECORD, payload(100))
    with pytest.raises(HeaderError, match=reason):
        fs_format.decode_header(mutate(encoded))


def test_mismatch_names_the_first_thing_that_disagrees():
    header = fs_format.decode_header(fs_format.encode_header(RECORD, payload(100)))
    size = header.file_size
    assert fs_format.mismatch(header, file_size=size, key=KEY, payload_len=100) is None
    assert "file is" in fs_format.mismatch(header, file_size=size - 1, key=KEY)
    assert "expected 99" in fs_format.mismatch(header, file_size=size, payload_len=99)
    other = ObjectKey("llama", 2, 0, bytes(range(16)), "tenant")
    assert "key record" in fs_format.mismatch(header, file_size=size, key=other)


def test_a_record_that_is_not_a_key_is_a_mismatch():
    header = fs_format.decode_header(fs_format.encode_header(b"\xc1garbage", payload(10)))
    assert fs_format.mismatch(header, file_size=header.file_size, key=KEY) is not None
    with pytest.raises(HeaderError):
        fs_format.stored_key(header)


@pytest.mark.parametrize("payload_len", [0, 1, 4095, 4096, 4097, 5 * 4096, 7 * 4096 + 3])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_parts_cover_the_payload_in_whole_segments(payload_len, parts):
    ranges = [fs_format.part_range(payload_len, 4096, part, parts) for part in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == payload_len
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi == lo
    assert all(lo % 4096 == 0 for lo, _ in ranges)
