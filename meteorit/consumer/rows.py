"""Rows: a batch of queue records decoded into the columns the sinks store, and the
records that cannot be stored, each with its reason, as dead letters.

Owns: what the consumer accepts from the queue (a JSON object with a non-empty string
`id` of at most 128 characters and `type` of at most 256, a 64-bit integer `received_at`
in ms, and `ts` absent, a number or a string: the queue record of meteorit.record,
with the HTTP API's own limits) and the dead-letter entry layout. Must not touch: Redis
or the sinks.

An integer `ts` outside 64 bits (the API takes any integer) is stored as NULL: no
database column takes it as a number, it is no time at all (2^63 ms is 292 million
years), and the event, accepted with a 202, must still reach the table; the `event`
column keeps the client's value verbatim. A `received_at` outside 64 bits was not set by
meteorit and goes to the dead letters. The length limits keep every id and type far
below PostgreSQL's largest index entry (2704 bytes), so no record can block a batch.

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

from ..record import INT64_MAX, INT64_MIN, MAX_ID_LENGTH, MAX_TYPE_LENGTH, TS_TYPES, rejection

COLUMNS = ("id", "type", "ts", "received_at", "event")
WIDTH = len(COLUMNS)


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
        if (type(ident) is str and 0 < len(ident) <= MAX_ID_LENGTH and type(kind) is str
                and 0 < len(kind) <= MAX_TYPE_LENGTH and type(received_at) is int
                and INT64_MIN <= received_at <= INT64_MAX and (ts is None or type(ts) in TS_TYPES)):
            if type(ts) is int and not INT64_MIN <= ts <= INT64_MAX:
                ts = None  # see the module docstring: stored, with NULL for ts
            columns += (ident, kind, ts, received_at, record.decode())
            good.append(record)
            if received_at > newest:
                newest = received_at
        else:
            rows.dead.append((record, rejection(record)))
    rows.newest_received_at = newest
    return rows


def dead_letter(record: bytes, reason: str, consumer: str) -> bytes:
    entry: dict[str, Any] = {"reason": reason, "consumer": consumer, "at": int(time.time() * 1000)}
    try:
        entry["record"] = record.decode()
    except UnicodeDecodeError:
        entry["record_b64"] = base64.b64encode(record).decode()
    return orjson.dumps(entry)
