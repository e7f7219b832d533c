"""Events: decode a request body and validate every event (meteorit.record encodes them).

Owns: the body formats (JSON object, JSON array, NDJSON, msgpack) and the request's
limits on them. The event rules and the queue record's layout are meteorit.record's.
Must not touch: sockets, Redis, HTTP framing.

A request is accepted whole or rejected whole: the first bad event raises `EventError`
with its index and the reason, and nothing of the request is queued.
"""

from __future__ import annotations

from typing import Any, Callable

import msgpack
import orjson

from ..errors import EventError
from ..record import invalid_reason

JSON = "json"
NDJSON = "ndjson"
MSGPACK = "msgpack"
CONTENT_TYPES = {
    b"application/json": JSON,
    b"text/plain": JSON,  # what sendBeacon and simple CORS requests send
    b"application/x-ndjson": NDJSON,
    b"application/ndjson": NDJSON,
    b"application/jsonlines": NDJSON,
    b"application/msgpack": MSGPACK,
    b"application/x-msgpack": MSGPACK,
    b"application/vnd.msgpack": MSGPACK,
}


def body_format(content_type: bytes | None) -> str | None:
    """The body format of a Content-Type header (parameters ignored); JSON when absent."""
    if not content_type:
        return JSON
    fmt = CONTENT_TYPES.get(content_type)  # as nearly every client writes it: no parsing
    if fmt is not None:
        return fmt
    media = content_type.split(b";", 1)[0].strip().lower()
    return CONTENT_TYPES.get(media)


def _json_events(body: bytes) -> list[Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if not body.strip():
            raise EventError(400, "empty body") from None
        raise EventError(400, f"body is not valid JSON: {exc}") from None
    if isinstance(doc, list):
        return doc
    return [doc]


def _ndjson_events(body: bytes) -> list[Any]:
    events = []
    for line_no, line in enumerate(body.split(b"\n")):
        if not line.strip():
            continue
        try:
            events.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise EventError(400, f"line {line_no + 1} is not valid JSON: {exc}", len(events)) from None
    return events


def _msgpack_events(body: bytes) -> list[Any]:
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise EventError(400, f"body is not valid msgpack: {exc}") from None
    if isinstance(doc, list):
        return doc
    return [doc]


_DECODERS: dict[str, Callable[[bytes], list[Any]]] = {
    JSON: _json_events, NDJSON: _ndjson_events, MSGPACK: _msgpack_events,
}


def decode(body: bytes, fmt: str, max_events: int) -> list[dict[str, Any]]:
    """Decode and validate a body into events; raises EventError for the first fault."""
    if fmt != JSON and not body.strip():  # JSON: orjson refuses it, then _json_events says why
        raise EventError(400, "empty body")
    events = _DECODERS[fmt](body)
    if not events:
        raise EventError(400, "no events in the request")
    if len(events) > max_events:
        raise EventError(413, f"{len(events)} events in one request; the limit is {max_events}")
    for index, event in enumerate(events):
        reason = invalid_reason(event)
        if reason:
            raise EventError(400, reason, index)
    return events
