"""Rows: a batch of queue records decoded into the columns the sinks store, and the
records that cannot be stored, each with its reason, as dead letters.

Owns: what the consumer accepts from the queue (a JSON object with a non-empty string
`id` and `type`, an integer `received_at` in ms, and `ts` absent, a number or a string:
the queue record meteorit.events builds) and the dead-letter entry layout. Must not
touch: Redis or the sinks.

The stored event is the record's own bytes: decoding only reads the columns out of it,
nothing is serialised again. Columns come out flat, five per record in table order
(id, type, ts, received_at, event), ready for one multi-row INSERT.

Dead-letter entry (one JSON object per element of `consumer.dead_letter`):
    {"reason": "...", "record": "<the record>", "consumer": "<id>", "at": <ms>}
with "record_b64" instead of "record" when the record is not UTF-8.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

COLUMNS = ("id", "type", "ts", "received_at", "event")
WIDTH = len(COLUMNS)
_TS_TYPES = (int, float, str)


@dataclass
class Rows:
    """The storable part of a batch, and its dead letters."""

    columns: list[Any] = field(default_factory=list)  # WIDTH values per row, flat
    records: list[bytes] = field(default_factory=list)  # the rows' records, same order
    dead: list[tuple[bytes, str]] = field(default_factory=list)  # (record, reason)
    newest_received_at: int = 0

    def __len__(self) -> int:
        return len(self.records)


def decode(records: list[bytes]) -> Rows:
    """Columns for every storable record; the others become (record, reason)."""
    rows = Rows()
    columns = rows.columns
    good = rows.records
    loads = orjson.loads
    newest = 0
    for record in records:
        try:
            event = loads(record)
            ident = event["id"]
            kind = event["type"]
            received_at = event["received_at"]
            ts = event.get("ts")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            rows.dead.append((record, rejection(record)))
            continue
        # the common case in one test; rejection() says why when it fails
        if (type(ident) is str and ident and type(kind) is str and kind and type(received_at) is int
                and (ts is None or type(ts) in _TS_TYPES)):
            columns += (ident, kind, ts, received_at, record.decode())
            good.append(record)
            if received_at > newest:
                newest = received_at
        else:
            rows.dead.append((record, rejection(record)))
    rows.newest_received_at = newest
    return rows


def rejection(record: bytes) -> str:
    """Why `record` cannot be stored (the slow path, for dead letters only)."""
    try:
        event = orjson.loads(record)
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON: {exc}"
    if type(event) is not dict:
        return f"not a JSON object but {type(event).__name__}"
    for name in ("id", "type"):
        value = event.get(name)
        if type(value) is not str or not value:
            return f"\"{name}\" must be a non-empty string, got {orjson.dumps(value).decode()[:64]}"
    if type(event.get("received_at")) is not int:
        return "\"received_at\" must be an integer (ms)"
    if "ts" in event and event["ts"] is not None and type(event["ts"]) not in _TS_TYPES:
        return "\"ts\" must be a number or a string"
    return "not storable"


def dead_letter(record: bytes, reason: str, consumer: str) -> bytes:
    entry: dict[str, Any] = {"reason": reason, "consumer": consumer, "at": int(time.time() * 1000)}
    try:
        entry["record"] = record.decode()
    except UnicodeDecodeError:
        entry["record_b64"] = base64.b64encode(record).decode()
    return orjson.dumps(entry)
