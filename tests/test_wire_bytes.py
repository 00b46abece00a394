"""The wire bytes of every message kind are pinned: a changed tag, field order, field type or
default shows up here as a different encoding, not only as a failed round trip.

The expected bytes are literals recorded from the protocol as released. Every field of a
sample has a distinct, non-default value, so swapped or retyped fields change the bytes. A
deliberate wire change (only ever an appended field with a default) updates the literal of
its kind in the commit that makes it.
"""

import typing

import pytest

from trio_kv.errors import ErrorCode
from trio_kv.keys import RequestKey
from trio_kv.protocol import (
    REQUEST_KINDS,
    AdapterUsage,
    Clear,
    Cleared,
    CudaAllocation,
    CudaRegistration,
    EndSession,
    Error,
    Hello,
    HelloOk,
    InstanceInfo,
    Limits,
    Lookup,
    LookupResult,
    Ping,
    Pong,
    Registered,
    RegisterKVCache,
    Released,
    ReleaseLookup,
    Reply,
    Request,
    Retrieve,
    RetrieveResult,
    SessionEnded,
    Status,
    StatusResult,
    Store,
    StoreResult,
    TensorSpec,
    TierStatus,
    Unregistered,
    UnregisterKVCache,
    decode_reply,
    decode_request,
    encode,
)

KEY = RequestKey(
    model="m", world_size=4, rank=3, tokens=[7, 8, 9], start=2, end=5, request_id="r", cache_salt="s"
)
PACKED = RequestKey(model="m", world_size=4, rank=None, tokens=b"\x01\x00\x00\x00")
USAGE = AdapterUsage(
    total_bytes_used=10, total_capacity_bytes=None, bytes_by_salt={"s": 10}, usage_fraction=-1.0
)

MESSAGES = {
    "hello": Hello(protocol_version=1, client_name="c", token="t"),
    "ping": Ping(),
    "register": RegisterKVCache(
        instance_id="i",
        block_size=16,
        tensors=[TensorSpec(offset=64, dtype="float16", shape=[2, 3], strides=[3, 1], block_dim=1)],
        shm_path="/dev/shm/kv",
        shm_bytes=4096,
        cuda=CudaRegistration(
            device_uuid=b"\x0a" * 16,
            allocations=[CudaAllocation(handle=b"\x0b" * 4, size=8192)],
            tensor_allocations=[0],
            event_handle=b"\x0c",
        ),
    ),
    "unregister": UnregisterKVCache(instance_id="i"),
    "store": Store(instance_id="i", key=KEY, block_ids=[4, 5], ipc_event=b"\x0d"),
    "lookup": Lookup(key=PACKED, claim=True),
    "retrieve": Retrieve(instance_id="i", key=KEY, block_ids=[6], skip_first_n_tokens=3, ipc_event=b"\x0e"),
    "release": ReleaseLookup(request_id="r", cache_salt="s", start=16, end=32),
    "end_session": EndSession(request_id="r", cache_salt="s"),
    "clear": Clear(cache_salt="s", include_l2=True),
    "status": Status(),
    "hello_ok": HelloOk(
        protocol_version=1,
        server_version="v",
        chunk_size=256,
        limits=Limits(
            max_message_bytes=1,
            max_tokens_per_key=2,
            max_block_ids=3,
            max_world_size=4,
            max_keys_per_request=5,
            max_id_chars=6,
        ),
    ),
    "pong": Pong(),
    "registered": Registered(instance_id="i", num_blocks=8, block_bytes=512),
    "unregistered": Unregistered(existed=True),
    "stored": StoreResult(stored=1, skipped_present=2, skipped_no_room=3, skipped_quota=4),
    "looked_up": LookupResult(hit_tokens=256, l1_chunks=1, l2_chunks=2),
    "retrieved": RetrieveResult(hit_tokens=256, chunks_written=1),
    "released": Released(leases_released=2),
    "session_ended": SessionEnded(leases_released=3, had_session=True),
    "cleared": Cleared(entries_removed=1, bytes_freed=2, l2_objects_deleted=3),
    "status_ok": StatusResult(
        server_version="v",
        uptime_s=1.5,
        chunk_size=256,
        l1=USAGE,
        l1_entries=1,
        leases=2,
        sessions=3,
        instances=[InstanceInfo(instance_id="i", num_blocks=8, block_size=16, block_bytes=512)],
        requests_in_flight=4,
        l2=[
            TierStatus(
                name="fs",
                kind="fs",
                usage=USAGE,
                healthy=True,
                state="ok",
                reason="",
                queue_depth=1,
                queued=2,
                dropped=3,
                skipped_evicted=4,
                written=5,
                write_failures=6,
                loads=7,
                load_failures=8,
                lookup_errors=9,
                evictions=10,
                quota_skips=11,
                write_timeouts=12,
                load_timeouts=13,
                evictions_by_reason={"lru": 14},
                evict_errors=15,
                lost=18,
                skipped_orphan=19,
                breaker_skips=20,
            )
        ],
        l1_evictions={"watermark": 16},
        l1_refusals={"capacity": 17},
        session_bytes=18,
        memory_bytes={"sessions": 19},
        layout_mismatches=20,
        inflight_hits=21,
        inflight_wait_timeouts=22,
        inflight_chunks=23,
    ),
    "error": Error(code=int(ErrorCode.BAD_SALT), message="e"),
}


WIRE_HEX = {
    "hello": "94a568656c6c6f01a163a174",
    "ping": "91a470696e67",
    "register": "97a87265676973746572a16910919540a7666c6f6174313692020392030101ab2f6465762f73686d2f6b76cd100094c4100a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a9192c4040b0b0b0bcd20009100c4010c",
    "unregister": "92aa756e7265676973746572a169",
    "store": "95a573746f7265a16998a16d0403930708090205a172a173920405c4010d",
    "lookup": "93a66c6f6f6b757098a16d04c0c4040100000000c0a0a0c3",
    "retrieve": "96a87265747269657665a16998a16d0403930708090205a172a173910603c4010e",
    "release": "95a772656c65617365a172a1731020",
    "end_session": "93ab656e645f73657373696f6ea172a173",
    "clear": "93a5636c656172a173c3",
    "status": "91a6737461747573",
    "hello_ok": "95a868656c6c6f5f6f6b01a176cd010096010203040506",
    "pong": "91a4706f6e67",
    "registered": "94aa72656769737465726564a16908cd0200",
    "unregistered": "92ac756e72656769737465726564c3",
    "stored": "95a673746f72656401020304",
    "looked_up": "94a96c6f6f6b65645f7570cd01000102",
    "retrieved": "93a9726574726965766564cd010001",
    "released": "92a872656c656173656402",
    "session_ended": "93ad73657373696f6e5f656e64656403c3",
    "cleared": "94a7636c6561726564010203",
    "status_ok": "dc0013a97374617475735f6f6ba176cb3ff8000000000000cd010084b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff00000000000000102039194a1690810cd02000491de0018a46e616d65a26673a46b696e64a26673a5757361676584b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff0000000000000a76865616c746879c3a57374617465a26f6ba6726561736f6ea0ab71756575655f646570746801a671756575656402a764726f7070656403af736b69707065645f6576696374656404a77772697474656e05ae77726974655f6661696c7572657306a56c6f61647307ad6c6f61645f6661696c7572657308ad6c6f6f6b75705f6572726f727309a96576696374696f6e730aab71756f74615f736b6970730bae77726974655f74696d656f7574730cad6c6f61645f74696d656f7574730db36576696374696f6e735f62795f726561736f6e81a36c72750eac65766963745f6572726f72730fa46c6f737412ae736b69707065645f6f727068616e13ad627265616b65725f736b6970731481a977617465726d61726b1081a86361706163697479111281a873657373696f6e731314151617",
    "error": "93a56572726f7206a165",
}


def test_every_message_kind_has_a_pinned_encoding():
    kinds = {t.__struct_config__.tag for t in typing.get_args(Request) + typing.get_args(Reply)}
    assert set(MESSAGES) == kinds == set(WIRE_HEX)


@pytest.mark.parametrize("tag", sorted(WIRE_HEX))
def test_message_encodes_to_the_pinned_bytes(tag):
    message = MESSAGES[tag]
    assert message.__struct_config__.tag == tag
    assert encode(message).hex() == WIRE_HEX[tag]


@pytest.mark.parametrize("tag", sorted(WIRE_HEX))
def test_pinned_bytes_decode_to_the_message(tag):
    buf = bytes.fromhex(WIRE_HEX[tag])
    decoded = decode_request(buf, len(buf)) if tag in REQUEST_KINDS else decode_reply(buf)
    assert decoded == MESSAGES[tag]


# status_ok as servers sent it before l1_evictions, l1_refusals and TierStatus.evict_errors were
# appended: a newer client still reads it, the appended fields at their defaults.
STATUS_OK_BEFORE_APPENDED_FIELDS = "9ba97374617475735f6f6ba176cb3ff8000000000000cd010084b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff00000000000000102039194a1690810cd02000491de0014a46e616d65a26673a46b696e64a26673a5757361676584b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff0000000000000a76865616c746879c3a57374617465a26f6ba6726561736f6ea0ab71756575655f646570746801a671756575656402a764726f7070656403af736b69707065645f6576696374656404a77772697474656e05ae77726974655f6661696c7572657306a56c6f61647307ad6c6f61645f6661696c7572657308ad6c6f6f6b75705f6572726f727309a96576696374696f6e730aab71756f74615f736b6970730bae77726974655f74696d656f7574730cad6c6f61645f74696d656f7574730db36576696374696f6e735f62795f726561736f6e81a36c72750e"


# status_ok as servers sent it before layout_mismatches was appended.
STATUS_OK_BEFORE_LAYOUT_MISMATCHES = "9da97374617475735f6f6ba176cb3ff8000000000000cd010084b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff00000000000000102039194a1690810cd02000491de0015a46e616d65a26673a46b696e64a26673a5757361676584b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff0000000000000a76865616c746879c3a57374617465a26f6ba6726561736f6ea0ab71756575655f646570746801a671756575656402a764726f7070656403af736b69707065645f6576696374656404a77772697474656e05ae77726974655f6661696c7572657306a56c6f61647307ad6c6f61645f6661696c7572657308ad6c6f6f6b75705f6572726f727309a96576696374696f6e730aab71756f74615f736b6970730bae77726974655f74696d656f7574730cad6c6f61645f74696d656f7574730db36576696374696f6e735f62795f726561736f6e81a36c72750eac65766963745f6572726f72730f81a977617465726d61726b1081a8636170616369747911"


def test_a_status_reply_without_layout_mismatches_still_decodes():
    decoded = decode_reply(bytes.fromhex(STATUS_OK_BEFORE_LAYOUT_MISMATCHES))
    assert isinstance(decoded, StatusResult)
    assert decoded.layout_mismatches == 0
    assert decoded.l1_refusals == {"capacity": 17}


def test_a_status_reply_without_the_appended_fields_still_decodes():
    decoded = decode_reply(bytes.fromhex(STATUS_OK_BEFORE_APPENDED_FIELDS))
    assert isinstance(decoded, StatusResult)
    assert decoded.l1_evictions == {} and decoded.l1_refusals == {}
    assert decoded.l2[0].evict_errors == 0
    assert decoded.l2[0].evictions_by_reason == {"lru": 14}


# hello_ok before Limits.max_id_chars and status_ok before session_bytes and memory_bytes were
# appended: both still decode, the appended fields at their defaults.
HELLO_OK_BEFORE_MAX_ID_CHARS = "95a868656c6c6f5f6f6b01a176cd0100950102030405"
STATUS_OK_BEFORE_SESSION_BYTES = "9da97374617475735f6f6ba176cb3ff8000000000000cd010084b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff00000000000000102039194a1690810cd02000491de0015a46e616d65a26673a46b696e64a26673a5757361676584b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff0000000000000a76865616c746879c3a57374617465a26f6ba6726561736f6ea0ab71756575655f646570746801a671756575656402a764726f7070656403af736b69707065645f6576696374656404a77772697474656e05ae77726974655f6661696c7572657306a56c6f61647307ad6c6f61645f6661696c7572657308ad6c6f6f6b75705f6572726f727309a96576696374696f6e730aab71756f74615f736b6970730bae77726974655f74696d656f7574730cad6c6f61645f74696d656f7574730db36576696374696f6e735f62795f726561736f6e81a36c72750eac65766963745f6572726f72730f81a977617465726d61726b1081a8636170616369747911"


def test_replies_without_the_session_and_id_limits_still_decode():
    hello = decode_reply(bytes.fromhex(HELLO_OK_BEFORE_MAX_ID_CHARS))
    assert isinstance(hello, HelloOk) and hello.limits.max_id_chars == 256
    status = decode_reply(bytes.fromhex(STATUS_OK_BEFORE_SESSION_BYTES))
    assert isinstance(status, StatusResult)
    assert status.session_bytes == 0 and status.memory_bytes == {}
    assert status.l1_refusals == {"capacity": 17}


# status_ok as servers sent it before TierStatus.lost, skipped_orphan and breaker_skips were appended.
STATUS_OK_BEFORE_WRITE_BEHIND_LOSS = "9da97374617475735f6f6ba176cb3ff8000000000000cd010084b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff00000000000000102039194a1690810cd02000491de0015a46e616d65a26673a46b696e64a26673a5757361676584b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff0000000000000a76865616c746879c3a57374617465a26f6ba6726561736f6ea0ab71756575655f646570746801a671756575656402a764726f7070656403af736b69707065645f6576696374656404a77772697474656e05ae77726974655f6661696c7572657306a56c6f61647307ad6c6f61645f6661696c7572657308ad6c6f6f6b75705f6572726f727309a96576696374696f6e730aab71756f74615f736b6970730bae77726974655f74696d656f7574730cad6c6f61645f74696d656f7574730db36576696374696f6e735f62795f726561736f6e81a36c72750eac65766963745f6572726f72730f81a977617465726d61726b1081a8636170616369747911"


def test_a_status_reply_without_the_write_behind_loss_counters_still_decodes():
    decoded = decode_reply(bytes.fromhex(STATUS_OK_BEFORE_WRITE_BEHIND_LOSS))
    assert isinstance(decoded, StatusResult)
    tier = decoded.l2[0]
    assert (tier.lost, tier.skipped_orphan, tier.breaker_skips) == (0, 0, 0)
    assert (tier.evict_errors, tier.write_failures) == (15, 6)


# hello as clients sent it before ``token`` was appended: still a Hello, with no token.
HELLO_BEFORE_TOKEN = "93a568656c6c6f01a163"


def test_a_hello_without_the_token_still_decodes():
    buf = bytes.fromhex(HELLO_BEFORE_TOKEN)
    assert decode_request(buf, len(buf)) == Hello(protocol_version=1, client_name="c", token="")


# lookup as clients sent it before ``claim``, status_ok as servers sent it before the in-flight
# counters were appended: both still decode, the appended fields at their defaults.
LOOKUP_BEFORE_CLAIM = "92a66c6f6f6b757098a16d04c0c4040100000000c0a0a0"
STATUS_OK_BEFORE_INFLIGHT = "dc0010a97374617475735f6f6ba176cb3ff8000000000000cd010084b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff00000000000000102039194a1690810cd02000491de0018a46e616d65a26673a46b696e64a26673a5757361676584b0746f74616c5f62797465735f757365640ab4746f74616c5f63617061636974795f6279746573c0ad62797465735f62795f73616c7481a1730aae75736167655f6672616374696f6ecbbff0000000000000a76865616c746879c3a57374617465a26f6ba6726561736f6ea0ab71756575655f646570746801a671756575656402a764726f7070656403af736b69707065645f6576696374656404a77772697474656e05ae77726974655f6661696c7572657306a56c6f61647307ad6c6f61645f6661696c7572657308ad6c6f6f6b75705f6572726f727309a96576696374696f6e730aab71756f74615f736b6970730bae77726974655f74696d656f7574730cad6c6f61645f74696d656f7574730db36576696374696f6e735f62795f726561736f6e81a36c72750eac65766963745f6572726f72730fa46c6f737412ae736b69707065645f6f727068616e13ad627265616b65725f736b6970731481a977617465726d61726b1081a86361706163697479111281a873657373696f6e731314"


def test_a_lookup_without_claim_still_decodes():
    buf = bytes.fromhex(LOOKUP_BEFORE_CLAIM)
    assert decode_request(buf, len(buf)) == Lookup(key=PACKED, claim=False)


def test_a_status_reply_without_the_inflight_counters_still_decodes():
    decoded = decode_reply(bytes.fromhex(STATUS_OK_BEFORE_INFLIGHT))
    assert isinstance(decoded, StatusResult)
    assert (decoded.inflight_hits, decoded.inflight_wait_timeouts, decoded.inflight_chunks) == (0, 0, 0)
    assert decoded.layout_mismatches == 20
