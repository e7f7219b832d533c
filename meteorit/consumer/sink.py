"""What every sink shares: where the consumer stores decoded batches. One `write` commits
one batch whole.

Owns: the Sink protocol, the outcome of a write (Written), the two errors a sink raises
and the reason a refused row carries to the dead-letter list. Must not touch: Redis, or
any one database (meteorit.consumer.sqlite, .ndjson and .postgresql each own theirs; the
sink URL grammar and the table-name rule are settings, declared in meteorit.config).

Every sink stores the events table (id, type, ts, received_at, event; indexes on type and
received_at), or the records themselves for NDJSON, and skips an id it has already (a
redelivered batch), except NDJSON, which is at-least-once.

Errors: `SinkUnavailable` (retry later, nothing was stored), `SinkFailed` (stop: the
sink is gone for good) or, from `write`, rows the database refuses as data (a number
out of range, a string too long for an index...): the batch is then stored row by row,
and the refused rows are returned as rejected, for the dead-letter list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import MeteoritError
from .rows import Rows

REASON_CHARS = 300  # of a database's message in a dead letter's reason


class SinkUnavailable(MeteoritError):
    """The sink cannot take a batch now (down, locked, full); nothing of it was stored."""


class SinkFailed(MeteoritError):
    """The sink can never take anything again (stdout closed): the consumer must stop."""


@dataclass
class Written:
    """The outcome of one committed batch."""

    inserted: int  # new rows; the rest of the batch were duplicates by id
    rejected: list[tuple[bytes, str]]  # (record, reason) the database refused as data


class Sink(Protocol):
    kind: str
    writers: int  # batches it can commit at once
    to_stdout: bool

    async def open(self) -> None: ...

    async def write(self, rows: Rows) -> Written: ...

    async def close(self) -> None: ...


def refused(database: str, exc: BaseException) -> str:
    """A dead letter's reason: the database's own words, cut short (they may quote the data)."""
    text = f"{database} refused it: {type(exc).__name__}: {exc}"
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + "..."
