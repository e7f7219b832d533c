"""Events: body formats, the event rules, queue records and ids, as the app uses them:
`decode` then `records`."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meteorit.errors import EventError
from meteorit.record import IdGenerator
from meteorit.record import encode as records
from meteorit.worker.events import JSON, MSGPACK, NDJSON, body_format, decode

NOW_MS = 1_700_000_000_123


def accept(body: bytes, fmt: str = JSON, max_events: int = 1000,
           max_event_size: int = 65536) -> list[dict[str, Any]]:
    """What a request becomes in the queue: the records, decoded back for comparison."""
    out, total = records(decode(body, fmt, max_events), NOW_MS, IdGenerator(), max_event_size)
    assert total == sum(map(len, out))
    return [orjson.loads(r) for r in out]


def rejection(body: bytes, fmt: str = JSON, max_events: int = 1000,
              max_event_size: int = 65536) -> tuple[int, int | None, str]:
    with pytest.raises(EventError) as info:
        accept(body, fmt, max_events, max_event_size)
    return info.value.status, info.value.index, info.value.reason


# --- Content-Type


@pytest.mark.parametrize("content_type, fmt", [
    (None, JSON),
    (b"", JSON),
    (b"application/json", JSON),
    (b"application/json; charset=utf-8", JSON),
    (b"Application/JSON ; charset=UTF-8", JSON),
    (b"text/plain;charset=UTF-8", JSON),
    (b"application/x-ndjson", NDJSON),
    (b"application/ndjson; charset=utf-8", NDJSON),
    (b"application/jsonlines", NDJSON),
    (b"application/msgpack", MSGPACK),
    (b"application/x-msgpack", MSGPACK),
    (b"application/vnd.msgpack", MSGPACK),
    (b"text/html", None),
    (b"application/xml; charset=utf-8", None),
    (b"multipart/form-data; boundary=x", None),
    (b"application/jsonx", None),
])
def test_content_type_maps_to_a_body_format(content_type: bytes | None, fmt: str | None) -> None:
    assert body_format(content_type) == fmt


# --- body formats


def test_a_json_object_is_one_event() -> None:
    assert decode(b'{"type":"click","x":1}', JSON, 10) == [{"type": "click", "x": 1}]


def test_a_json_array_is_a_batch_in_order() -> None:
    assert decode(b'[{"type":"a"},{"type":"b","n":[1,2]}]', JSON, 10) == [
        {"type": "a"}, {"type": "b", "n": [1, 2]}]


def test_ndjson_skips_blank_lines_and_accepts_crlf_and_a_trailing_newline() -> None:
    body = b'\n{"type":"a"}\r\n\n   \n{"type":"b"}\n{"type":"c"}\n'
    assert decode(body, NDJSON, 10) == [{"type": "a"}, {"type": "b"}, {"type": "c"}]


def test_a_msgpack_map_is_one_event_and_an_array_a_batch() -> None:
    assert decode(msgpack.packb({"type": "open", "n": 1.5}), MSGPACK, 10) == [{"type": "open", "n": 1.5}]
    assert decode(msgpack.packb([{"type": "a"}, {"type": "b"}]), MSGPACK, 10) == [{"type": "a"}, {"type": "b"}]


# --- rejections: status, index of the first bad event, reason


@pytest.mark.parametrize("body, fmt, status, index, reason", [
    (b"", JSON, 400, None, "empty body"),
    (b" \r\n\t", JSON, 400, None, "empty body"),
    (b"\n\n", NDJSON, 400, None, "empty body"),
    (b"{", JSON, 400, None, "not valid JSON"),
    (b'{"type":"a"} {"type":"b"}', JSON, 400, None, "not valid JSON"),
    (b"[]", JSON, 400, None, "no events"),
    (b"42", JSON, 400, 0, "must be an object"),
    (b'"click"', JSON, 400, 0, "must be an object"),
    (b'[{"type":"a"}, null]', JSON, 400, 1, "must be an object"),
    (b'[{"type":"a"}, [{"type":"b"}]]', JSON, 400, 1, "must be an object"),
    (b'{"page":"/"}', JSON, 400, 0, '"type"'),
    (b'{"type":""}', JSON, 400, 0, '"type"'),
    (b'{"type":5}', JSON, 400, 0, '"type"'),
    (b'{"type":null}', JSON, 400, 0, '"type"'),
    (b'{"type":["a"]}', JSON, 400, 0, '"type"'),
    (b'{"type":"%s"}' % (b"t" * 257), JSON, 400, 0, "longer than 256"),
    (b'[{"type":"a"},{"type":"b","id":7}]', JSON, 400, 1, '"id"'),
    (b'{"type":"a","id":""}', JSON, 400, 0, '"id"'),
    (b'{"type":"a","id":null}', JSON, 400, 0, '"id"'),
    (b'{"type":"a","id":"%s"}' % (b"i" * 129), JSON, 400, 0, '"id"'),
    (b'{"type":"a","ts":true}', JSON, 400, 0, '"ts"'),
    (b'{"type":"a","ts":null}', JSON, 400, 0, '"ts"'),
    (b'{"type":"a","ts":[1]}', JSON, 400, 0, '"ts"'),
    (b'{"type":"a"}\n\n{"type":\n', NDJSON, 400, 1, "line 3 is not valid JSON"),
    (b'{"type":"a"}\n7\n', NDJSON, 400, 1, "must be an object"),
    (b'{"type":"a"}\n{"type":""}\n', NDJSON, 400, 1, '"type"'),
    (b"\xc1", MSGPACK, 400, None, "not valid msgpack"),
    (msgpack.packb({"type": "a"}) + b"\x01", MSGPACK, 400, None, "not valid msgpack"),
    (msgpack.packb({1: "x", "type": "a"}), MSGPACK, 400, None, "not valid msgpack"),
    (msgpack.packb([{"type": "a"}, {"type": b"bytes"}]), MSGPACK, 400, 1, '"type"'),
    (msgpack.packb([{"type": "a"}, {"type": "b", "blob": b"\x00\x01"}]), MSGPACK, 400, 1, "JSON"),
])
def test_a_bad_body_is_rejected_whole_with_the_index_and_reason(
        body: bytes, fmt: str, status: int, index: int | None, reason: str) -> None:
    got_status, got_index, got_reason = rejection(body, fmt)
    assert (got_status, got_index) == (status, index), got_reason
    assert reason in got_reason


def test_the_largest_type_and_id_are_accepted() -> None:
    event = {"type": "t" * 256, "id": "i" * 128}
    assert accept(orjson.dumps(event)) == [{**event, "received_at": NOW_MS}]


@pytest.mark.parametrize("ts", [1700000000, 1700000000.5, "2024-01-01T00:00:00Z"])
def test_ts_may_be_a_number_or_a_string(ts: Any) -> None:
    assert accept(orjson.dumps({"type": "a", "ts": ts}))[0]["ts"] == ts


@pytest.mark.parametrize("fmt, encode", [
    (JSON, orjson.dumps),
    (NDJSON, lambda evs: b"\n".join(map(orjson.dumps, evs))),
    (MSGPACK, msgpack.packb),
])
def test_more_events_than_max_events_get_413(fmt: str, encode: Any) -> None:
    batch = [{"type": "e"}] * 3
    assert len(accept(encode(batch), fmt, max_events=3)) == 3
    status, index, reason = rejection(encode(batch + [{"type": "e"}]), fmt, max_events=3)
    assert (status, index) == (413, None)
    assert "4 events" in reason and "3" in reason


def test_an_event_over_max_event_size_gets_413_with_its_index() -> None:
    small = {"type": "a", "id": "x"}
    record_size = len(orjson.dumps({**small, "received_at": NOW_MS}))
    assert accept(orjson.dumps([small]), max_event_size=record_size) == [{**small, "received_at": NOW_MS}]
    big = {"type": "a", "id": "x", "pad": "p"}
    status, index, reason = rejection(orjson.dumps([small, big, small]), max_event_size=record_size)
    assert (status, index) == (413, 1)
    assert str(record_size) in reason


# --- queue records


def test_records_keep_the_event_and_add_a_generated_id_and_received_at() -> None:
    sent = [{"type": "click", "page": "/", "n": [1, {"d": None}], "ts": 12.5},
            {"type": "view", "id": "client-id-1"}]
    out = accept(orjson.dumps(sent))
    generated = out[0].pop("id")
    assert uuid.UUID(generated).version == 7
    assert out == [{**sent[0], "received_at": NOW_MS}, {**sent[1], "received_at": NOW_MS}]


def test_records_get_distinct_ids() -> None:
    out = accept(orjson.dumps([{"type": "a"}] * 50))
    assert len({r["id"] for r in out}) == 50


def test_records_are_compact_json_bytes() -> None:
    out, total = records([{"type": "a", "id": "1"}], NOW_MS, IdGenerator(), 1000)
    assert out == [b'{"type":"a","id":"1","received_at":%d}' % NOW_MS]
    assert total == len(out[0])


# --- ids


def test_ids_are_uuid7_strings_with_the_rfc4122_variant_and_the_given_ms() -> None:
    ids = IdGenerator()
    for ms in (0, 1, NOW_MS, 2**48 - 1):
        text = ids.new(ms)
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lower-case, dashed
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert parsed.int >> 80 == ms


def test_ids_are_unique_over_100k_in_one_millisecond() -> None:
    ids = IdGenerator()
    assert len({ids.new(NOW_MS) for _ in range(100_000)}) == 100_000


def test_two_generators_in_the_same_millisecond_give_different_ids() -> None:
    # Two workers, or a worker and its respawned successor.
    a, b = IdGenerator(), IdGenerator()
    assert {a.new(NOW_MS) for _ in range(1000)}.isdisjoint({b.new(NOW_MS) for _ in range(1000)})


@pytest.mark.parametrize("counter", [0, 0xFE, 0xFFFF_FFF0])  # inside a byte, across one, across the wrap
def test_one_id_at_a_time_is_the_same_sequence_as_a_batch(counter: int) -> None:
    one, many = IdGenerator(), IdGenerator()
    many._middle, one._counter, many._counter = one._middle, counter, counter
    for ms in (NOW_MS, NOW_MS, NOW_MS + 1):
        assert [one.batch(ms, 1)[0] for _ in range(300)] == many.batch(ms, 300)


def test_ids_sort_by_time_across_milliseconds() -> None:
    ids = IdGenerator()
    made = [ids.new(NOW_MS + step) for step in range(0, 5000, 7) for _ in range(3)]
    later = [ids.new(NOW_MS + 5000 + i) for i in range(3)]
    assert all(made[i][:13] <= made[i + 1][:13] for i in range(len(made) - 1))
    assert max(made) < min(later)
    assert all(a < b for a, b in zip(made[::3], made[3::3]))  # each ms after the one before


# --- property: any valid event survives every format and becomes its record


JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
RESERVED = {"type", "id", "ts", "received_at"}


@st.composite
def valid_events(draw: Any) -> dict[str, Any]:
    event = draw(st.dictionaries(st.text(max_size=10), JSON_VALUE, max_size=6))
    for key in RESERVED:
        event.pop(key, None)
    event["type"] = draw(st.text(min_size=1, max_size=30))
    if draw(st.booleans()):
        event["id"] = draw(st.text(min_size=1, max_size=40))
    if draw(st.booleans()):
        event["ts"] = draw(st.integers(0, 2**53) | st.floats(0, 1e12) | st.text(max_size=30))
    return event


ENCODERS = {
    JSON: orjson.dumps,
    NDJSON: lambda evs: b"\n".join(map(orjson.dumps, evs)) + b"\n",
    MSGPACK: msgpack.packb,
}


@settings(max_examples=150)
@given(st.lists(valid_events(), min_size=1, max_size=8), st.sampled_from(sorted(ENCODERS)))
def test_valid_events_round_trip_into_their_records(sent: list[dict[str, Any]], fmt: str) -> None:
    original = copy.deepcopy(sent)
    decoded = decode(ENCODERS[fmt](sent), fmt, max_events=len(sent))
    assert decoded == original
    out, _ = records(decoded, NOW_MS, IdGenerator(), max_event_size=1 << 20)
    for event, record in zip(original, out):
        queued = orjson.loads(record)
        assert queued["received_at"] == NOW_MS
        if "id" in event:
            assert queued["id"] == event["id"]
        else:
            assert uuid.UUID(queued["id"]).version == 7
        assert queued == {**event, "id": queued["id"], "received_at": NOW_MS}
