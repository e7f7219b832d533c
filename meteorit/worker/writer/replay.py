"""Replaying spools into Redis: the worker's own spool, then the orphans (spools of
processes that are gone, found by their lock), chunk by chunk.

Owns: the order of a replay and when the spool's cursor moves: after each chunk Redis
acknowledged (the writer's `_push`, whatever the topology), so a replay cut short repeats
one chunk at most. Must not touch: the file format (spool/) or the connection (the writer).
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..spool import Spool, SpoolFile

log = logging.getLogger("meteorit.writer")


class Replayer(Protocol):
    """What a replay needs of the writer."""

    spool: Spool | None
    batch_max_events: int
    batch_max_bytes: int
    events_replayed: int

    def _can_replay(self) -> bool: ...

    async def _push(self, values: list[bytes]) -> Exception | None: ...


async def replay_spools(writer: Replayer) -> None:
    """Our own spool first, then the orphans, while Redis can take events."""
    spool = writer.spool
    assert spool is not None and spool.file is not None
    try:
        if spool.backlog > 0 and not await _replay_file(writer, spool.file):
            return
        while writer._can_replay():
            orphan = await spool.adopt_orphan()
            if orphan is None:
                return
            if not await _replay_orphan(writer, orphan):
                return
    except OSError as exc:
        log.error("spool replay failed: %s", exc)
    except Exception:
        log.exception("spool replay failed")


async def _replay_orphan(writer: Replayer, orphan: SpoolFile) -> bool:
    """Replay and remove an adopted spool; True once it is gone. Whatever stops it
    (Redis, an error, a cancel), the file is released: its lock, held on, would keep
    every worker from adopting it until this one exits."""
    assert writer.spool is not None
    if orphan.backlog > 0:
        log.info("replaying the spool of a process that is gone",
                 extra={"spool": orphan.name, "bytes": orphan.backlog})
    try:
        if not await _replay_file(writer, orphan):
            return False  # kept for a later try, by us or another worker
        await writer.spool.remove(orphan)  # closes it even when the unlink fails
        return True
    finally:
        if orphan.fd >= 0:
            await writer.spool.release(orphan)


async def _replay_file(writer: Replayer, spool_file: SpoolFile) -> bool:
    """Push `spool_file` into Redis from its cursor, chunk by chunk; True once it is all in."""
    assert writer.spool is not None
    while writer._can_replay():
        chunk = await writer.spool.read(spool_file, writer.batch_max_events, writer.batch_max_bytes)
        if chunk.records:
            if await writer._push(chunk.records) is not None:
                return False
            writer.events_replayed += len(chunk.records)
        elif chunk.end == chunk.start:
            return True
        await writer.spool.advance(spool_file, chunk)
    return False
