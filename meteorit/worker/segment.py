"""The Segment tracking API: what existing analytics SDKs send, taken as meteorit events.

Owns: the routes' paths and their call types, the bodies of a batch and of a single call,
the rules a message must meet (as Segment documents them), how a message becomes a queue
record, the limits on message and batch size (`[segment]`), and the answers the SDKs
understand. The steps of every event request (key, Origin rules, request context, records,
rate limit, writer) are the app's, the same as for `POST /v1/events`. Must not touch:
sockets, Redis, the bus; a message or a write key is never logged nor kept in a record.

    POST /v1/batch      {"batch": [message, ...], "context"?, "integrations"?, "sentAt"?, "writeKey"?}
    POST /v1/track      one message; also /v1/identify, /v1/page, /v1/screen, /v1/group, /v1/alias

A message becomes one record, kept as sent, but for:
- `type`: the message's own; a single call sets it from its path when absent (and refuses
  another one);
- `id`: the message's `messageId` (so the consumer's insert, idempotent by id, stores an
  SDK's retry once, which is what messageId is for), a UUIDv7 when absent; a messageId
  that is not a string of 1 to 128 characters (the record's id) is refused, 400;
- `ts`: the message's `timestamp` (kept too), unless it has a `ts` of its own;
- `context`, `integrations`: the batch's top-level objects fill in the keys a message's own
  objects do not have (the message's win);
- `writeKey`: removed, wherever it is.

Answers: 200 `{"success": true}` once Redis or the spool has every message (the SDKs take
any 2xx as delivered); every refusal of the payload is a 400 (the SDKs drop it, as Segment
answers 400 past its limits), with meteorit's `error` and `index` and the `code` and
`message` the SDKs log; 401 and 403 for keys; 429 and 503 with Retry-After, which the SDKs
retry. A request is accepted whole or refused whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from . import events
from .. import metrics, record
from ..errors import EventError
from .http import Exchange
from .keys import NO_KEY
from .response import RETRY_AFTER

if TYPE_CHECKING:
    from .app import EventsApp

CALL_TYPES = ("track", "identify", "page", "screen", "group", "alias")
BATCH = None  # the call of /v1/batch: each message says its own type
ROUTES: dict[bytes, str | None] = {b"/v1/batch": BATCH, **{b"/v1/" + t.encode(): t for t in CALL_TYPES}}

WRITE_KEY = "writeKey"
MESSAGE_ID = "messageId"
TIMESTAMP = "timestamp"
IDENTITIES = ("userId", "anonymousId")
MERGED = ("context", "integrations")  # a batch's own fill in each message's
# the field each call type needs besides an identity (Segment's spec)
REQUIRED = {"track": "event", "group": "groupId", "alias": "previousId"}

SUCCESS_BODY = b'{"success":true}'
SPOOLED_BODY = b'{"success":true,"spooled":true}'  # on disk, replayed into Redis once it is back
# The SDKs retry 408, 429 and 5xx and drop other 4xx: every fault of the payload is a 400,
# as Segment's own API answers it (limits, JSON, content type alike).
PAYLOAD_STATUSES = {413: 400, 415: 400}
REFUSAL_HEADERS = {401: b'WWW-Authenticate: Basic realm="meteorit"\r\n', 503: RETRY_AFTER}


class Limits:
    """The sizes of one config: `[segment]` and `limits.max_events_per_request`."""

    __slots__ = ("max_message", "max_batch", "max_messages")

    def __init__(self, max_message: int, max_batch: int, max_messages: int) -> None:
        self.max_message = max_message
        self.max_batch = max_batch
        self.max_messages = max_messages


# --- the body and its messages (no HTTP: these take bytes and give events)


def parse(body: bytes, call: str | None, limits: Limits) -> tuple[dict[str, Any], str | None]:
    """The body's JSON object and the write key in it (removed from it), or EventError."""
    limit = limits.max_batch if call is BATCH else limits.max_message
    if len(body) > limit:
        what = "a batch" if call is BATCH else "a single call"
        raise EventError(413, f"body is {len(body)} bytes; the limit for {what} is {limit}")
    if not body.strip():
        raise EventError(400, "empty body")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(400, f"body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise EventError(400, "body must be a JSON object")
    write_key = doc.pop(WRITE_KEY, None)
    if write_key is not None and type(write_key) is not str:
        raise EventError(401, "\"writeKey\" must be a string")
    return doc, write_key


def messages(doc: dict[str, Any], call: str | None, limits: Limits) -> list[dict[str, Any]]:
    """The body's messages, checked and mapped into events (see the module's docstring);
    EventError with the index of the first bad one."""
    if call is not BATCH:
        _check(doc, 0, call, limits, {})
        return [doc]
    batch = doc.get("batch")
    if type(batch) is not list:
        raise EventError(400, "\"batch\" must be an array of messages")
    if not batch:
        raise EventError(400, "no messages in the batch")
    if len(batch) > limits.max_messages:
        raise EventError(413, f"{len(batch)} messages in one batch; the limit is {limits.max_messages}")
    shared = {}
    for name in MERGED:
        value = doc.get(name)
        if value is not None:
            if type(value) is not dict:
                raise EventError(400, f"the batch's \"{name}\" must be an object")
            shared[name] = value
    for index, message in enumerate(batch):
        _check(message, index, call, limits, shared)
    return batch


def _check(message: Any, index: int, call: str | None, limits: Limits, shared: dict[str, dict[str, Any]]) -> None:
    if type(message) is not dict:
        raise EventError(400, "message must be an object", index)
    if call is BATCH:
        message.pop(WRITE_KEY, None)  # analytics.js puts it in each message: never stored
        size = len(orjson.dumps(message))  # a single call's size is its body's, checked already
        if size > limits.max_message:
            raise EventError(413, f"message is {size} bytes; the limit is {limits.max_message}", index)
        kind = message.get("type")
        if kind not in CALL_TYPES:
            raise EventError(400, "\"type\" must be one of " + ", ".join(CALL_TYPES), index)
    else:
        kind = message.setdefault("type", call)
        if kind != call:
            raise EventError(400, f"\"type\" must be \"{call}\" on /v1/{call}, or absent", index)
    reason = _missing(message, kind)
    if reason:
        raise EventError(400, reason, index)
    _take_message_id(message, index)
    _take_timestamp(message)
    for name in MERGED:
        _merge(message, name, shared.get(name), index)
    reason = record.invalid_reason(message)  # the record's own rules (`ts`)
    if reason:
        raise EventError(400, reason, index)


def _missing(message: dict[str, Any], kind: str) -> str | None:
    """Why a message of this type lacks what Segment requires of it, or None."""
    if not any(_is_identity(message.get(name)) for name in IDENTITIES):
        return f"{_a(kind)} message needs \"userId\" or \"anonymousId\" (a non-empty string or a number)"
    required = REQUIRED.get(kind)
    if required is not None:
        value = message.get(required)
        valid = (type(value) is str and value) if kind == "track" else _is_identity(value)
        if not valid:
            return f"{_a(kind)} message needs \"{required}\""
    return None


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _is_identity(value: Any) -> bool:
    if type(value) is str:
        return bool(value)
    return type(value) in (int, float)


def _take_message_id(message: dict[str, Any], index: int) -> None:
    """The record's `id` is the messageId: the consumer stores each id once."""
    message_id = message.get(MESSAGE_ID)
    if message_id is None:
        if "id" in message:
            raise EventError(400, "\"id\" is the record's id, taken from \"messageId\": send a messageId", index)
        return  # record.encode gives it a UUIDv7
    if type(message_id) is not str or not message_id or len(message_id) > record.MAX_ID_LENGTH:
        raise EventError(400, f"\"messageId\" must be a non-empty string of at most {record.MAX_ID_LENGTH} "
                         "characters", index)
    if message.setdefault("id", message_id) != message_id:
        raise EventError(400, "\"id\" is the record's id, taken from \"messageId\", and differs from it", index)


def _take_timestamp(message: dict[str, Any]) -> None:
    """The record's `ts` (the client's time of the event: a column of the consumer's table)
    is the message's `timestamp` when it has no `ts` of its own; `timestamp` stays as sent.
    A timestamp `ts` could not hold is left where it is (Segment does not refuse it)."""
    stamp = message.get(TIMESTAMP)
    if "ts" not in message and type(stamp) in record.TS_TYPES and stamp != "":
        message["ts"] = stamp


def _merge(message: dict[str, Any], name: str, batch_value: dict[str, Any] | None, index: int) -> None:
    own = message.get(name)
    if own is None:
        if batch_value is not None:
            message[name] = batch_value  # shared by the batch's records: nothing writes into it
        return
    if type(own) is not dict:
        raise EventError(400, f"\"{name}\" must be an object", index)
    if batch_value is not None:
        message[name] = {**batch_value, **own}


# --- the routes


def post(app: EventsApp, exchange: Exchange, start: float, url: bytes, headers: dict[bytes, bytes],
         body: bytes, call: str | None) -> None:
    """POST /v1/batch or a single call: the app's steps, with Segment's body and answers."""
    app.counters.bytes_in += len(body)
    cors = app.cors_headers(headers) if app.cors_on else b""
    try:
        if events.body_format(headers.get(b"content-type")) != events.JSON:
            raise EventError(415, "use Content-Type application/json")
        encoding = headers.get(b"content-encoding")
        if encoding is not None:
            body = app.inflate(body, encoding)
        doc, write_key = parse(body, call, app.segment)
        # the key may be in the body: read only once the body is; the messages' rules after it
        key = app.identify(url, headers, body_key=write_key) if app.auth_on else NO_KEY
        records, size = app.records(exchange, headers, messages(doc, call, app.segment))
    except EventError as exc:
        return app.refuse(exchange, start, exc, 1, cors, ANSWER)
    app.submit(exchange, start, key, records, size, cors, ANSWER)


class SegmentAnswer:
    """How a Segment route answers: `{"success": true}`, or the refusal an SDK understands."""

    @staticmethod
    def accepted(app: EventsApp, exchange: Exchange, start: float, count: int, spooled: bool,
                 extra: bytes) -> None:
        app.reply(exchange, start, 200, SPOOLED_BODY if spooled else SUCCESS_BODY, extra)

    @staticmethod
    def refused(app: EventsApp, exchange: Exchange, start: float, exc: EventError, extra: bytes) -> None:
        status = PAYLOAD_STATUSES.get(exc.status, exc.status)
        app.reply(exchange, start, status, refusal_body(exc), REFUSAL_HEADERS.get(status, b"") + extra)


ANSWER = SegmentAnswer()


def refusal_body(exc: EventError) -> bytes:
    """meteorit's `error` (and `index`), and the `code` and `message` an SDK logs."""
    body: dict[str, Any] = {"success": False, "code": metrics.reject_reason(exc.status),
                            "message": exc.reason, "error": exc.reason}
    if exc.index is not None:
        body["index"] = exc.index
    return orjson.dumps(body)
