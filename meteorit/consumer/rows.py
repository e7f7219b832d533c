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
nothing is serialised again. Columns come out one list each (ids, types, ts,
received_at, events), built by C loops (map) rather than a Python step per record;
the sinks zip slices of them into their rows the same way.

Two decoders, one rule. The fast one (msgspec, into a struct of the four columns,
skipping the rest of the record without building it) takes a whole batch at once and
checks the limits above while parsing; the records it refuses, and every record of a
batch where it refused one, go one by one through the general one (orjson), which
stores what it can and says why it cannot. The fast one only takes what the general one
takes, with the same values, except a number out of the double range (1e400) in a field
the consumer does not read: orjson refuses it, msgspec skips it, and the record, valid
JSON, is stored. Profiled: the general decoder built a dict of every field of every
record, 1.9 s of the consumer's 1M-event drain on the event loop's thread; the fast one
takes 1.0 s.

Dead-letter entry (one JSON object per element of `consumer.dead_letter`):
    {"reason": "...", "record": "<the record>", "consumer": "<id>", "at": <ms>}
with "record_b64" instead of "record" when the record is not UTF-8.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Annotated, Any, Union

import msgspec
import orjson

from ..record import INT64_MAX, INT64_MIN, MAX_ID_LENGTH, MAX_TYPE_LENGTH, TS_TYPES, rejection

COLUMNS = ("id", "type", "ts", "received_at", "event")
WIDTH = len(COLUMNS)

_Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]


class _Columns(msgspec.Struct, gc=False):
    """What the fast decoder reads out of a record; anything else fails it (see above)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TYPE_LENGTH)]
    received_at: _Int64
    ts: Union[_Int64, float, str, None] = None


_fast = msgspec.json.Decoder(_Columns).decode
_ids, _types, _ts, _received_at = (attrgetter(name) for name in ("id", "type", "ts", "received_at"))
_FAST_ERRORS = (msgspec.DecodeError, UnicodeDecodeError)


@dataclass
class Rows:
    """The storable part of a batch, one list per column, and its dead letters."""

    ids: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    ts: list[Any] = field(default_factory=list)  # None, int (64 bits), float or str
    received_at: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # each record's own text
    records: list[bytes] = field(default_factory=list)  # the rows' records, same order
    dead: list[tuple[bytes, str]] = field(default_factory=list)  # (record, reason)
    newest_received_at: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def add(self, ident: str, kind: str, ts: Any, received_at: int, record: bytes) -> None:
        self.ids.append(ident)
        self.types.append(kind)
        self.ts.append(ts)
        self.received_at.append(received_at)
        self.events.append(record.decode())
        self.records.append(record)
        if received_at > self.newest_received_at:
            self.newest_received_at = received_at

    def row(self, i: int) -> tuple[Any, ...]:
        """Row i's WIDTH values, in table order."""
        return self.ids[i], self.types[i], self.ts[i], self.received_at[i], self.events[i]

    @property
    def columns(self) -> list[Any]:
        """Every row's values flat, WIDTH per row in table order (built on each call)."""
        return [value for i in range(len(self.records)) for value in self.row(i)]


def decode(records: list[bytes]) -> Rows:
    """Columns for every storable record; the others become (record, reason)."""
    try:
        decoded = list(map(_fast, records))
        events = list(map(bytes.decode, records))  # the one check of UTF-8 the fast decoder skips
    except _FAST_ERRORS:
        return _decode_one_by_one(records)
    received_at = list(map(_received_at, decoded))
    return Rows(list(map(_ids, decoded)), list(map(_types, decoded)), list(map(_ts, decoded)), received_at,
                events, list(records), [], max(0, max(received_at, default=0)))


def _decode_one_by_one(records: list[bytes]) -> Rows:
    rows = Rows()
    for record in records:
        try:
            fast = _fast(record)
            record.decode()
        except _FAST_ERRORS:
            _decode_general(record, rows)
        else:
            rows.add(fast.id, fast.type, fast.ts, fast.received_at, record)
    return rows


def _decode_general(record: bytes, rows: Rows) -> None:
    """The record as a row of `rows`, or as one of its dead letters."""
    try:
        event = orjson.loads(record)
        ident = event["id"]
        kind = event["type"]
        received_at = event["received_at"]
        ts = event.get("ts")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        rows.dead.append((record, rejection(record)))
        return
    # the common case in one test; rejection() says why when it fails
    if (type(ident) is str and 0 < len(ident) <= MAX_ID_LENGTH and type(kind) is str
            and 0 < len(kind) <= MAX_TYPE_LENGTH and type(received_at) is int
            and INT64_MIN <= received_at <= INT64_MAX and (ts is None or type(ts) in TS_TYPES)):
        if type(ts) is int and not INT64_MIN <= ts <= INT64_MAX:
            ts = None  # see the module docstring: stored, with NULL for ts
        rows.add(ident, kind, ts, received_at, record)
    else:
        rows.dead.append((record, rejection(record)))


def dead_letter(record: bytes, reason: str, consumer: str) -> bytes:
    entry: dict[str, Any] = {"reason": reason, "consumer": consumer, "at": int(time.time() * 1000)}
    try:
        entry["record"] = record.decode()
    except UnicodeDecodeError:
        entry["record_b64"] = base64.b64encode(record).decode()
    return orjson.dumps(entry)
