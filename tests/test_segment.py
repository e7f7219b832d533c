"""The Segment tracking API's rules, without sockets: the body of a batch and of a single
call, each message's rules, its mapping into a queue record (type, id from messageId, the
batch's context and integrations), the size limits, and the refusal an SDK reads.
(tests/test_segment_api.py drives the same over HTTP; tests/test_segment_sdks.py with the
real SDKs.)"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meteorit import record
from meteorit.errors import EventError
from meteorit.worker import segment
from meteorit.worker.segment import BATCH, Limits, messages, parse, refusal_body

LIMITS = Limits(max_message=32 * 1024, max_batch=500 * 1024, max_messages=1000)
TRACK = {"type": "track", "event": "Signed Up", "userId": "u1", "messageId": "m-1"}


def body(doc: Any) -> bytes:
    return orjson.dumps(doc)


def mapped(doc: dict[str, Any], call: str | None = BATCH, limits: Limits = LIMITS) -> list[dict[str, Any]]:
    """The events a body becomes, as the route takes them (parse, then the messages)."""
    parsed, _ = parse(body(doc), call, limits)
    return messages(parsed, call, limits)


def refused(doc: Any, call: str | None = BATCH, limits: Limits = LIMITS) -> EventError:
    with pytest.raises(EventError) as caught:
        parsed, _ = parse(doc if isinstance(doc, bytes) else body(doc), call, limits)
        messages(parsed, call, limits)
    return caught.value


def test_the_routes_are_the_paths_the_sdks_post_to() -> None:
    assert segment.ROUTES == {b"/v1/batch": None, b"/v1/track": "track", b"/v1/identify": "identify",
                              b"/v1/page": "page", b"/v1/screen": "screen", b"/v1/group": "group",
                              b"/v1/alias": "alias"}


# --- mapping


def test_each_message_of_a_batch_stays_as_sent_with_its_message_id_as_id() -> None:
    sent = [dict(TRACK), {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}, "messageId": "m-2"}]
    got = mapped({"batch": [dict(m) for m in sent], "sentAt": "2026-01-01T00:00:00Z"})
    assert got == [{**m, "id": m["messageId"]} for m in sent]


def test_a_message_without_message_id_gets_a_uuid7_from_the_record() -> None:
    events = mapped({"batch": [{"type": "page", "anonymousId": "a1", "name": "Home"}]})
    assert "id" not in events[0]  # record.encode gives it one, as to any event without an id
    records, _ = record.encode(events, 1_700_000_000_000, record.IdGenerator(), 65536)
    ident = orjson.loads(records[0])["id"]
    assert len(ident) == 36 and ident[14] == "7"


def test_the_timestamp_is_the_records_ts_too_unless_the_message_has_its_own() -> None:
    stamp = "2026-05-01T10:00:00.000Z"
    [sent, own, odd, empty, number] = mapped({"batch": [
        {**TRACK, "timestamp": stamp}, {**TRACK, "timestamp": stamp, "ts": 5},
        {**TRACK, "timestamp": {"at": stamp}}, {**TRACK, "timestamp": ""}, {**TRACK, "timestamp": 1.5e12}]})
    assert (sent["ts"], sent["timestamp"]) == (stamp, stamp)
    assert own["ts"] == 5
    assert "ts" not in odd and odd["timestamp"] == {"at": stamp}  # kept as sent, not refused
    assert "ts" not in empty and number["ts"] == 1.5e12


def test_a_null_message_id_is_no_message_id() -> None:
    assert "id" not in mapped({"batch": [{**TRACK, "messageId": None}]})[0]


def test_the_batch_context_and_integrations_fill_in_what_a_message_lacks() -> None:
    doc = {"context": {"library": {"name": "analytics-python"}, "ip": "10.0.0.1"},
           "integrations": {"All": True, "Mixpanel": False},
           "batch": [dict(TRACK),
                     {**TRACK, "messageId": "m-2", "context": {"ip": "192.0.2.7", "locale": "fr-FR"},
                      "integrations": {"Mixpanel": True}}]}
    first, second = mapped(doc)
    assert first["context"] == {"library": {"name": "analytics-python"}, "ip": "10.0.0.1"}
    assert first["integrations"] == {"All": True, "Mixpanel": False}
    # the message's own keys win; the batch's fill in the rest
    assert second["context"] == {"library": {"name": "analytics-python"}, "ip": "192.0.2.7", "locale": "fr-FR"}
    assert second["integrations"] == {"All": True, "Mixpanel": True}


def test_without_a_batch_context_a_message_keeps_its_own_or_none() -> None:
    first, second = mapped({"batch": [dict(TRACK), {**TRACK, "context": {"ip": "192.0.2.7"}}]})
    assert "context" not in first and second["context"] == {"ip": "192.0.2.7"}


def test_a_single_call_takes_its_type_from_the_path() -> None:
    assert mapped({"event": "Clicked", "userId": "u1"}, "track") == [
        {"event": "Clicked", "userId": "u1", "type": "track"}]
    assert mapped({"type": "screen", "userId": "u1", "name": "Home"}, "screen")[0]["type"] == "screen"
    for call in segment.CALL_TYPES:
        doc = {"userId": "u1", "event": "e", "groupId": "g1", "previousId": "p1"}
        assert mapped(doc, call)[0]["type"] == call


def test_the_write_key_is_read_and_never_kept() -> None:
    doc, key = parse(body({"writeKey": "wk", "batch": [{**TRACK, "writeKey": "wk"}]}), BATCH, LIMITS)
    assert key == "wk" and "writeKey" not in doc
    assert "writeKey" not in messages(doc, BATCH, LIMITS)[0]
    doc, key = parse(body({"writeKey": "wk", "event": "e", "userId": "u"}), "track", LIMITS)
    assert key == "wk" and messages(doc, "track", LIMITS) == [{"event": "e", "userId": "u", "type": "track"}]
    assert parse(body({"batch": []}), BATCH, LIMITS)[1] is None


def test_numbers_are_identities_too() -> None:
    assert mapped({"batch": [{"type": "alias", "userId": 42, "previousId": 7}]})[0]["userId"] == 42


# --- refusals: the reason and the index of the first bad message


@pytest.mark.parametrize(("message", "reason"), [
    ({"type": "track", "userId": "u1"}, "a track message needs \"event\""),
    ({"type": "track", "userId": "u1", "event": ""}, "a track message needs \"event\""),
    ({"type": "track", "userId": "u1", "event": 3}, "a track message needs \"event\""),
    ({"type": "group", "userId": "u1"}, "a group message needs \"groupId\""),
    ({"type": "alias", "userId": "u1"}, "an alias message needs \"previousId\""),
    ({"type": "identify", "traits": {}}, "needs \"userId\" or \"anonymousId\""),
    ({"type": "identify", "userId": "", "anonymousId": None}, "needs \"userId\" or \"anonymousId\""),
    ({"type": "identify", "userId": True}, "needs \"userId\" or \"anonymousId\""),
    ({"type": "pageview", "userId": "u1"}, "\"type\" must be one of track, identify, page, screen, group, alias"),
    ({"userId": "u1"}, "\"type\" must be one of"),
    ({**TRACK, "messageId": "x" * 129}, "\"messageId\" must be a non-empty string of at most 128 characters"),
    ({**TRACK, "messageId": 12}, "\"messageId\" must be a non-empty string"),
    ({**TRACK, "messageId": ""}, "\"messageId\" must be a non-empty string"),
    ({**TRACK, "id": "other"}, "differs from it"),
    ({"type": "track", "event": "e", "userId": "u1", "id": "mine"}, "send a messageId"),
    ({**TRACK, "context": "web"}, "\"context\" must be an object"),
    ({**TRACK, "integrations": ["All"]}, "\"integrations\" must be an object"),
    ({**TRACK, "ts": [1]}, "\"ts\" must be a number or a string"),
    ("track", "message must be an object"),
])
def test_a_bad_message_is_refused_with_its_index(message: Any, reason: str) -> None:
    error = refused({"batch": [dict(TRACK), message]})
    assert (error.status, error.index) == (400, 1)
    assert reason in error.reason


def test_a_message_id_of_128_characters_is_taken_and_an_equal_id_is_fine() -> None:
    assert mapped({"batch": [{**TRACK, "messageId": "x" * 128}]})[0]["id"] == "x" * 128
    assert mapped({"batch": [{**TRACK, "id": "m-1"}]})[0]["id"] == "m-1"


@pytest.mark.parametrize(("doc", "reason"), [
    ({"batch": {"type": "track"}}, "\"batch\" must be an array of messages"),
    ({"messages": []}, "\"batch\" must be an array of messages"),
    ({"batch": []}, "no messages in the batch"),
    ({"batch": [TRACK], "context": []}, "the batch's \"context\" must be an object"),
    ({"batch": [TRACK], "integrations": "x"}, "the batch's \"integrations\" must be an object"),
    ([TRACK], "body must be a JSON object"),
    (b"{\"batch\": [", "body is not valid JSON"),
    (b"  \n", "empty body"),
])
def test_a_bad_body_is_refused(doc: Any, reason: str) -> None:
    error = refused(doc)
    assert (error.status, error.index) == (400, None)
    assert reason in error.reason


def test_a_write_key_that_is_not_a_string_is_no_key() -> None:
    assert refused({"writeKey": ["k"], "batch": [TRACK]}).status == 401


def test_a_single_call_refuses_another_type() -> None:
    error = refused({"type": "identify", "userId": "u1"}, "track")
    assert (error.status, error.reason) == (400, "\"type\" must be \"track\" on /v1/track, or absent")


# --- limits: 32 KB a message, 500 KB a batch, max_events_per_request messages


def padded(size: int) -> dict[str, Any]:
    """A track message whose compact JSON is `size` bytes."""
    message = {**TRACK, "properties": {"pad": ""}}
    message["properties"]["pad"] = "x" * (size - len(orjson.dumps(message)))
    assert len(orjson.dumps(message)) == size
    return message


def test_a_message_of_the_limit_passes_and_one_byte_more_is_refused() -> None:
    limits = Limits(max_message=2000, max_batch=500 * 1024, max_messages=1000)
    assert mapped({"batch": [padded(2000)]}, limits=limits)
    error = refused({"batch": [dict(TRACK), padded(2001)]}, limits=limits)
    assert (error.status, error.index) == (413, 1)  # the route answers it 400
    assert error.reason == "message is 2001 bytes; the limit is 2000"


def test_a_batch_over_its_size_is_refused_before_it_is_parsed() -> None:
    limits = Limits(max_message=32 * 1024, max_batch=1000, max_messages=1000)
    assert refused(b"[" * 1001, limits=limits).reason == "body is 1001 bytes; the limit for a batch is 1000"
    raw = body({"batch": [padded(900)]})
    assert len(raw) < 1000 and mapped({"batch": [padded(900)]}, limits=limits)


def test_a_single_call_is_bounded_by_the_message_size() -> None:
    limits = Limits(max_message=100, max_batch=500 * 1024, max_messages=1000)
    error = refused(b" " * 101, "track", limits)
    assert (error.status, error.reason) == (413, "body is 101 bytes; the limit for a single call is 100")


def test_more_messages_than_max_events_per_request_are_refused() -> None:
    limits = Limits(max_message=32 * 1024, max_batch=500 * 1024, max_messages=3)
    assert len(mapped({"batch": [dict(TRACK)] * 3}, limits=limits)) == 3
    assert refused({"batch": [dict(TRACK)] * 4}, limits=limits).reason == \
        "4 messages in one batch; the limit is 3"


# --- the refusal an SDK reads


def test_a_refusal_has_meteorits_error_and_the_code_and_message_an_sdk_logs() -> None:
    assert orjson.loads(refusal_body(EventError(400, "a track message needs \"event\"", 3))) == {
        "success": False, "code": "invalid", "message": "a track message needs \"event\"",
        "error": "a track message needs \"event\"", "index": 3}
    assert orjson.loads(refusal_body(EventError(503, "queue unavailable"))) == {
        "success": False, "code": "unavailable", "message": "queue unavailable", "error": "queue unavailable"}


# --- whatever the body, an EventError or events that encode into records


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
FIELDS = st.sampled_from(["type", "event", "userId", "anonymousId", "messageId", "id", "groupId", "previousId",
                          "context", "integrations", "ts", "timestamp", "writeKey", "properties"])
MESSAGES = st.dictionaries(FIELDS, JSON_VALUES | st.sampled_from(list(segment.CALL_TYPES)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(MESSAGES | JSON_VALUES, max_size=4),
       top=st.dictionaries(st.sampled_from(["context", "integrations", "writeKey", "sentAt"]), JSON_VALUES),
       call=st.sampled_from([BATCH, *segment.CALL_TYPES]))
def test_any_body_is_refused_with_a_reason_or_becomes_records(batch: list[Any], top: dict[str, Any],
                                                              call: str | None) -> None:
    doc = {**top, "batch": batch} if call is BATCH else (batch[0] if batch else top)
    try:
        parsed, _ = parse(body(doc), call, LIMITS)
        events = messages(parsed, call, LIMITS)
    except EventError as exc:
        assert exc.status in (400, 401, 413) and exc.reason
        return
    records, _ = record.encode(events, 1_700_000_000_000, record.IdGenerator(), 1 << 20)
    for raw in records:
        stored = orjson.loads(raw)
        assert stored["type"] in segment.CALL_TYPES and "writeKey" not in stored
        assert stored["id"] == stored.get("messageId", stored["id"])
        if "timestamp" in stored and type(stored["timestamp"]) in (int, float, str) and stored["timestamp"] != "":
            assert "ts" in stored  # the message's own, or its timestamp
