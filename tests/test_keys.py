"""Keys: chunking, chained prefix hashes, salts, request-key validation, rank expansion,
and the per-request hash sessions that let repeated calls hash only new tokens."""

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_kv.core.sessions import HashSessions
from trio_kv.errors import ErrorCode, TrioKVError
from trio_kv.keys import (
    ObjectKey,
    RequestKey,
    chunk_hashes,
    expand_ranks,
    pack_tokens,
    packed_key,
    packed_prefix,
    token_count,
    validate_request_key,
    validate_salt,
)

CHUNK = 4


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def reference_hashes(token_ids: list[int], chunk_size: int) -> list[bytes]:
    """The hash chain recomputed from its definition: blake2b-128 over the previous
    hash (16 zero bytes for the first chunk) followed by the chunk as little-endian uint32."""
    prev = bytes(16)
    out = []
    for start in range(0, len(token_ids) - chunk_size + 1, chunk_size):
        chunk = token_ids[start : start + chunk_size]
        prev = hashlib.blake2b(prev + struct.pack(f"<{len(chunk)}I", *chunk), digest_size=16).digest()
        out.append(prev)
    return out


def key(token_ids: list[int], **fields) -> RequestKey:
    fields.setdefault("rank", 0)
    return RequestKey(
        model=fields.pop("model", "model"),
        world_size=fields.pop("world_size", 2),
        tokens=token_ids,
        **fields,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sessions(**kwargs) -> tuple[HashSessions, FakeClock]:
    clock = FakeClock()
    kwargs.setdefault("ttl", 10.0)
    kwargs.setdefault("max_sessions", 16)
    return HashSessions(chunk_size=CHUNK, clock=clock, **kwargs), clock


# ---------------------------------------------------------------- chunking and hashing


def test_only_full_chunks_are_hashed():
    assert len(chunk_hashes(tokens(3 * CHUNK + CHUNK - 1), CHUNK)) == 3


def test_fewer_tokens_than_a_chunk_give_no_hashes():
    assert chunk_hashes(tokens(CHUNK - 1), CHUNK) == []
    assert chunk_hashes([], CHUNK) == []


def test_hashes_are_16_bytes():
    assert all(len(h) == 16 for h in chunk_hashes(tokens(5 * CHUNK), CHUNK))


def test_hashes_match_blake2b_chain_over_little_endian_uint32_tokens():
    token_ids = [0, 1, 2**32 - 1, 70000, 5, 6, 7, 8, 123456789, 10, 11, 12]
    assert chunk_hashes(token_ids, CHUNK) == reference_hashes(token_ids, CHUNK)


def test_same_prefix_gives_same_leading_hashes():
    shared = tokens(2 * CHUNK)
    a = chunk_hashes([*shared, *tokens(2 * CHUNK, start=100)], CHUNK)
    b = chunk_hashes([*shared, *tokens(2 * CHUNK, start=200)], CHUNK)
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]


def test_change_in_chunk_i_changes_hashes_from_i_on_but_not_before():
    original = tokens(5 * CHUNK)
    original_hashes = chunk_hashes(original, CHUNK)
    for changed_chunk in range(5):
        changed = list(original)
        changed[changed_chunk * CHUNK + 1] += 1000
        changed_hashes = chunk_hashes(changed, CHUNK)
        assert changed_hashes[:changed_chunk] == original_hashes[:changed_chunk]
        for i in range(changed_chunk, 5):
            assert changed_hashes[i] != original_hashes[i]


def test_equal_chunks_at_different_positions_hash_differently():
    repeated = [7] * (2 * CHUNK)
    first, second = chunk_hashes(repeated, CHUNK)
    assert first != second


# ---------------------------------------------------------------- salts


def test_salt_of_128_characters_is_accepted():
    assert validate_salt("s" * 128) == "s" * 128


def test_empty_salt_is_accepted():
    assert validate_salt("") == ""


def test_salt_of_129_characters_is_rejected():
    with pytest.raises(TrioKVError) as caught:
        validate_salt("s" * 129)
    assert caught.value.code is ErrorCode.BAD_SALT


@pytest.mark.parametrize("forbidden", ["@", "/", "\\", "\x00"])
def test_salt_with_forbidden_character_is_rejected(forbidden):
    with pytest.raises(TrioKVError) as caught:
        validate_salt(f"tenant{forbidden}a")
    assert caught.value.code is ErrorCode.BAD_SALT


def test_request_key_with_bad_salt_is_rejected():
    with pytest.raises(TrioKVError) as caught:
        validate_request_key(key(tokens(8), cache_salt="a/b"), needs_rank=False)
    assert caught.value.code is ErrorCode.BAD_SALT


# ---------------------------------------------------------------- request keys


def test_valid_request_key_passes():
    validate_request_key(key(tokens(8), rank=1, start=4, end=8), needs_rank=True)


def test_rank_less_key_passes_when_no_rank_is_needed():
    validate_request_key(key(tokens(8), rank=None), needs_rank=False)


@pytest.mark.parametrize("rank", [-1, 2, 3])
def test_rank_outside_the_world_is_rejected(rank):
    with pytest.raises(TrioKVError) as caught:
        validate_request_key(key(tokens(8), rank=rank, world_size=2), needs_rank=True)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT


def test_missing_rank_is_rejected_when_needed():
    with pytest.raises(TrioKVError) as caught:
        validate_request_key(key(tokens(8), rank=None), needs_rank=True)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT


def test_world_size_below_one_is_rejected():
    with pytest.raises(TrioKVError) as caught:
        validate_request_key(key(tokens(8), rank=None, world_size=0), needs_rank=False)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("start", "end"),
    [(-1, None), (0, 9), (5, 4), (9, None), (0, -1)],
    ids=["negative-start", "end-past-tokens", "start-after-end", "start-past-tokens", "negative-end"],
)
def test_bad_token_range_is_rejected(start, end):
    with pytest.raises(TrioKVError) as caught:
        validate_request_key(key(tokens(8), start=start, end=end), needs_rank=True)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT


def test_empty_range_at_the_end_is_accepted():
    validate_request_key(key(tokens(8), start=8, end=8), needs_rank=True)


# ---------------------------------------------------------------- rank expansion


def test_expand_ranks_is_chunk_major():
    hashes = [b"a" * 16, b"b" * 16]
    rank_less = key(tokens(8), rank=None, world_size=3, cache_salt="t")
    assert expand_ranks(rank_less, hashes) == [
        ObjectKey("model", 3, rank, h, "t") for h in hashes for rank in range(3)
    ]


def test_object_keys_differ_by_salt():
    h = b"h" * 16
    assert ObjectKey("m", 1, 0, h, "a") != ObjectKey("m", 1, 0, h, "b")
    assert ObjectKey("m", 1, 0, h, "") != ObjectKey("m", 1, 0, h, "b")


# ---------------------------------------------------------------- hash sessions


def test_session_hashes_equal_plain_hashes():
    hs, _ = sessions()
    prompt = tokens(3 * CHUNK + 2)
    assert hs.hashes(key(prompt, request_id="r"), len(prompt)) == chunk_hashes(prompt, CHUNK)


def test_session_hashes_only_up_to_end():
    hs, _ = sessions()
    prompt = tokens(4 * CHUNK)
    assert hs.hashes(key(prompt, request_id="r"), 2 * CHUNK + 1) == chunk_hashes(prompt, CHUNK)[:2]


def test_growing_prompt_hashes_only_new_chunks():
    hs, _ = sessions()
    prompt = tokens(6 * CHUNK)
    hs.hashes(key(prompt[: 2 * CHUNK], request_id="r"), 2 * CHUNK)
    assert hs.chunks_hashed == 2
    grown = hs.hashes(key(prompt[: 5 * CHUNK], request_id="r"), 5 * CHUNK)
    assert hs.chunks_hashed == 5
    assert grown == chunk_hashes(prompt[: 5 * CHUNK], CHUNK)


def test_repeating_the_same_prompt_hashes_nothing_new():
    hs, _ = sessions()
    prompt = tokens(3 * CHUNK)
    first = hs.hashes(key(prompt, request_id="r"), len(prompt))
    again = hs.hashes(key(prompt, request_id="r"), len(prompt))
    assert again == first
    assert hs.chunks_hashed == 3


def test_changed_prompt_is_rehashed_from_scratch():
    hs, _ = sessions()
    prompt = tokens(3 * CHUNK)
    hs.hashes(key(prompt, request_id="r"), len(prompt))
    changed = [prompt[0] + 1, *prompt[1:]]
    result = hs.hashes(key(changed, request_id="r"), len(changed))
    assert result == chunk_hashes(changed, CHUNK)
    assert hs.chunks_hashed == 6


def test_shorter_prompt_reuses_the_cache():
    hs, _ = sessions()
    prompt = tokens(4 * CHUNK)
    hs.hashes(key(prompt, request_id="r"), len(prompt))
    shorter = hs.hashes(key(prompt[: 2 * CHUNK], request_id="r"), 2 * CHUNK)
    assert shorter == chunk_hashes(prompt, CHUNK)[:2]
    assert hs.chunks_hashed == 4


def test_shorter_then_full_prompt_again_hashes_nothing_new():
    hs, _ = sessions()
    prompt = tokens(4 * CHUNK)
    hs.hashes(key(prompt, request_id="r"), len(prompt))
    hs.hashes(key(prompt[:CHUNK], request_id="r"), CHUNK)
    hs.hashes(key(prompt, request_id="r"), len(prompt))
    assert hs.chunks_hashed == 4


def test_requests_without_id_are_not_cached():
    hs, _ = sessions()
    prompt = tokens(2 * CHUNK)
    hs.hashes(key(prompt), len(prompt))
    hs.hashes(key(prompt), len(prompt))
    assert hs.chunks_hashed == 4
    assert len(hs) == 0


def test_sessions_are_per_request_id():
    hs, _ = sessions()
    prompt = tokens(2 * CHUNK)
    hs.hashes(key(prompt, request_id="a"), len(prompt))
    hs.hashes(key(prompt, request_id="b"), len(prompt))
    assert hs.chunks_hashed == 4
    assert len(hs) == 2


def test_sessions_are_per_salt():
    hs, _ = sessions()
    prompt = tokens(2 * CHUNK)
    hs.hashes(key(prompt, request_id="r", cache_salt="a"), len(prompt))
    hs.hashes(key(prompt, request_id="r", cache_salt="b"), len(prompt))
    assert hs.chunks_hashed == 4
    assert len(hs) == 2


def test_session_is_kept_just_before_its_ttl():
    hs, clock = sessions(ttl=10.0)
    prompt = tokens(2 * CHUNK)
    hs.hashes(key(prompt, request_id="r"), len(prompt))
    clock.now += 9.9
    hs.hashes(key(prompt, request_id="r"), len(prompt))
    assert hs.chunks_hashed == 2


def test_session_expires_after_ttl():
    hs, clock = sessions(ttl=10.0)
    prompt = tokens(2 * CHUNK)
    hs.hashes(key(prompt, request_id="r"), len(prompt))
    clock.now += 10.1
    hs.hashes(key(prompt, request_id="r"), len(prompt))
    assert hs.chunks_hashed == 4


def test_use_extends_a_session_ttl():
    hs, clock = sessions(ttl=10.0)
    prompt = tokens(2 * CHUNK)
    for _ in range(3):
        hs.hashes(key(prompt, request_id="r"), len(prompt))
        clock.now += 8.0
    assert hs.chunks_hashed == 2


def test_expired_sessions_are_dropped_on_next_call():
    hs, clock = sessions(ttl=10.0)
    prompt = tokens(CHUNK)
    hs.hashes(key(prompt, request_id="old"), len(prompt))
    clock.now += 11.0
    hs.hashes(key(prompt, request_id="new"), len(prompt))
    assert len(hs) == 1
    assert hs.end("", "old") is False


def test_max_sessions_evicts_least_recently_used():
    hs, clock = sessions(max_sessions=2)
    prompt = tokens(CHUNK)
    hs.hashes(key(prompt, request_id="a"), len(prompt))
    clock.now += 1
    hs.hashes(key(prompt, request_id="b"), len(prompt))
    clock.now += 1
    hs.hashes(key(prompt, request_id="a"), len(prompt))  # b is now the least recent
    clock.now += 1
    hs.hashes(key(prompt, request_id="c"), len(prompt))
    assert len(hs) == 2
    assert hs.chunks_hashed == 3
    hs.hashes(key(prompt, request_id="a"), len(prompt))
    assert hs.chunks_hashed == 3  # a survived
    hs.hashes(key(prompt, request_id="b"), len(prompt))
    assert hs.chunks_hashed == 4  # b was evicted


def test_end_forgets_a_session():
    hs, _ = sessions()
    prompt = tokens(2 * CHUNK)
    hs.hashes(key(prompt, request_id="r", cache_salt="t"), len(prompt))
    assert hs.end("t", "r") is True
    assert len(hs) == 0
    hs.hashes(key(prompt, request_id="r", cache_salt="t"), len(prompt))
    assert hs.chunks_hashed == 4


def test_end_of_unknown_session_returns_false():
    hs, _ = sessions()
    assert hs.end("", "nobody") is False


def test_end_needs_the_matching_salt():
    hs, _ = sessions()
    hs.hashes(key(tokens(CHUNK), request_id="r", cache_salt="t"), CHUNK)
    assert hs.end("other", "r") is False
    assert len(hs) == 1


session_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("hash"),
            st.sampled_from(["a", "b", ""]),  # request id ("" means no session)
            st.integers(0, 6 * CHUNK),  # prompt length
            st.integers(0, 2),  # which prompt variant
            st.integers(0, 6 * CHUNK),  # end
        ),
        st.tuples(st.just("end"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("tick"), st.floats(0, 8)),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(session_ops)
def test_session_hashes_always_equal_fresh_hashes(ops):
    hs, clock = sessions(ttl=10.0, max_sessions=2)
    variants = [tokens(6 * CHUNK), tokens(6 * CHUNK, start=1), [*tokens(3 * CHUNK), *tokens(3 * CHUNK, 50)]]
    for op in ops:
        if op[0] == "hash":
            _, request_id, length, variant, end = op
            prompt = variants[variant][:length]
            end = min(end, length)
            got = hs.hashes(key(prompt, request_id=request_id), end)
            assert got == chunk_hashes(prompt[:end], CHUNK)
        elif op[0] == "end":
            hs.end("", op[1])
        else:
            clock.now += op[1]
        assert len(hs) <= 2


def test_packed_tokens_hash_like_listed_tokens():
    tokens = list(range(100, 100 + 3 * 16 + 5))
    listed = RequestKey("m", 1, 0, tokens, request_id="r")
    packed = packed_key(listed)
    assert isinstance(packed.tokens, bytes)
    assert token_count(packed) == token_count(listed) == len(tokens)
    assert packed_prefix(packed, 20) == packed_prefix(listed, 20) == pack_tokens(tokens[:20])
    sessions = HashSessions(16, 60.0, 10, lambda: 0.0)
    assert sessions.hashes(packed, len(tokens)) == chunk_hashes(tokens, 16)


def test_packed_tokens_must_be_whole_uint32s():
    key = RequestKey("m", 1, 0, b"\x00" * 7)
    with pytest.raises(TrioKVError) as err:
        validate_request_key(key, needs_rank=True)
    assert err.value.code == ErrorCode.INVALID_ARGUMENT


def test_a_repeated_or_shorter_call_hashes_nothing_and_keeps_the_session_s_size():
    hs, _ = sessions()
    prompt = tokens(3 * CHUNK)
    full = hs.hashes(key(prompt, request_id="r"), len(prompt))
    size = hs.nbytes
    assert hs.hashes(key(prompt, request_id="r"), len(prompt)) == full
    assert hs.hashes(key(prompt[: 2 * CHUNK], request_id="r"), 2 * CHUNK) == full[:2]
    assert (hs.chunks_hashed, hs.nbytes, len(hs)) == (3, size, 1)
