"""The PostgreSQL sink: postgresql://user@host:port/db (or postgres://).

Owns: the events table in PostgreSQL and how a batch gets there. Must not touch: Redis.

asyncpg, binary COPY, `consumer.concurrency` connections committing in parallel. A batch
is COPied straight into the table in one transaction; if an id is there already (a
redelivered batch), it goes the other way: COPY into a temporary staging table, then
INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING. A row the server refuses as data
(class 22, class 54 such as an index entry over 2704 bytes) or asyncpg cannot encode (an
int8 overflow) makes the batch go in row by row; the refused rows come back as rejected.

Every statement has `stall` seconds (statement_timeout on the server, a client timeout
just above it): a table lock held elsewhere, or a server gone silent, becomes
SinkUnavailable and a retry instead of a wait without end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import orjson

from ..values import check_table
from .rows import Rows
from .sink import SinkUnavailable, Written, refused

log = logging.getLogger("meteorit.sinks")

PG_STAGING = "meteorit_staging"
PG_TIMEOUT_MARGIN = 1.0  # the client's timeout over statement_timeout: the server's comes first
PG_CLOSE_TIMEOUT = 5.0  # then the connections are dropped


class PgRows:
    """A batch's rows for COPY, made afresh on each iteration (a COPY that failed on a
    duplicate id is tried again through the staging table). Not a list of tuples: 10,000
    tuples alive at once per batch set off the garbage collector about every 700, 3.0 s
    of a 1M drain; made one at a time, each is gone before the next (zip reuses it)."""

    def __init__(self, rows: Rows) -> None:
        dumps = orjson.dumps  # `ts` goes in a text column: numbers become their JSON text
        self.ts = [t if t is None or type(t) is str else str(t) if type(t) is int else dumps(t).decode()
                   for t in rows.ts]
        self.rows = rows

    def __len__(self) -> int:
        return len(self.ts)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        rows = self.rows
        return zip(rows.ids, rows.types, self.ts, rows.received_at, rows.events)


class PostgresSink:
    kind = "postgresql"
    to_stdout = False

    def __init__(self, dsn: str, table: str, writers: int, stall: float) -> None:
        self.dsn = dsn
        self.table = check_table(table)
        self.writers = writers
        self.stall = stall
        self.pool: Any = None
        self.insert = f"INSERT INTO {self.table} SELECT * FROM {PG_STAGING} ON CONFLICT (id) DO NOTHING"

    def _timeouts(self) -> dict[str, Any]:
        """asyncpg's connect options: no statement (nor connection attempt) lasts past `stall`."""
        return {"timeout": self.stall + PG_TIMEOUT_MARGIN, "command_timeout": self.stall + PG_TIMEOUT_MARGIN,
                "server_settings": {"statement_timeout": str(max(1, round(self.stall * 1000)))}}

    @staticmethod
    def _row_errors() -> tuple[type[BaseException], ...]:
        """What a row's data raises: a value the server refuses (class 22), one over a limit
        (class 54: an index entry too large), or one asyncpg cannot encode (an int8 overflow)."""
        import asyncpg
        return (asyncpg.DataError, asyncpg.ProgramLimitExceededError, OverflowError, ValueError)

    def schema(self) -> str:
        # COLLATE "C": ids and types are compared as bytes, not by the locale (faster indexes).
        # `event` is json, the record's exact text: storing it costs a syntax check where
        # jsonb would rebuild it (1M events: 6.9 s against 11.3 s here); cast to jsonb to query.
        t = self.table
        return (f'CREATE TABLE IF NOT EXISTS {t} (id text COLLATE "C" PRIMARY KEY, '
                f'type text COLLATE "C" NOT NULL, ts text, received_at bigint NOT NULL, event json NOT NULL);'
                f"CREATE INDEX IF NOT EXISTS {t}_type ON {t} (type);"
                f"CREATE INDEX IF NOT EXISTS {t}_received_at ON {t} (received_at);")

    async def open(self) -> None:
        if self.pool is not None:
            return
        import asyncpg  # only the PostgreSQL sink needs it (pip install meteorit[postgresql])
        try:
            conn = await asyncpg.connect(self.dsn, **self._timeouts())
            try:
                async with conn.transaction():
                    # two consumers starting at once must not both create the table
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"meteorit:{self.table}")
                    await conn.execute(self.schema())
            finally:
                await conn.close(timeout=PG_CLOSE_TIMEOUT)
            self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.writers, init=self._staging,
                                                  **self._timeouts())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise SinkUnavailable(f"postgresql: {exc}") from exc
        log.info("postgresql sink open", extra={"table": self.table, "writers": self.writers})

    @staticmethod
    async def _staging(conn: Any) -> None:
        await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {PG_STAGING} (id text, type text, ts text, "
                           f"received_at bigint, event json) ON COMMIT DELETE ROWS")

    async def write(self, rows: Rows) -> Written:
        import asyncpg
        await self.open()
        tuples = PgRows(rows)
        row_errors = self._row_errors()
        try:
            async with self.pool.acquire() as conn:
                try:
                    return Written(await self._copy(conn, tuples), [])
                except row_errors:
                    return await self._write_one_by_one(conn, tuples, rows.records)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise SinkUnavailable(f"postgresql: {exc}") from exc

    async def _copy(self, conn: Any, tuples: PgRows | list[tuple[Any, ...]]) -> int:
        """Rows stored. COPY straight into the table first: a batch seen for the first time
        has no id in the table, and that path costs half of staging + INSERT. A redelivered
        batch fails it on the primary key and takes the staging path, which skips what is
        there already (COPY into a staging table, INSERT ... ON CONFLICT DO NOTHING)."""
        import asyncpg
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(self.table, records=tuples)
            return len(tuples)
        except asyncpg.UniqueViolationError:
            pass
        async with conn.transaction():
            await conn.copy_records_to_table(PG_STAGING, records=tuples)
            status = await conn.execute(self.insert)
        return int(status.rsplit(" ", 1)[1])

    async def _write_one_by_one(self, conn: Any, tuples: PgRows, records: list[bytes]) -> Written:
        """A row PostgreSQL refuses as data (a NUL in a text column) must not hold up the batch."""
        row_errors = self._row_errors()
        inserted = 0
        rejected = []
        for row, record in zip(tuples, records):
            try:
                inserted += await self._copy(conn, [row])
            except row_errors as exc:
                rejected.append((record, refused("postgresql", exc)))
        return Written(inserted, rejected)

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        try:  # a connection stuck in a statement must not hold up the exit
            await asyncio.wait_for(pool.close(), PG_CLOSE_TIMEOUT)
        except TimeoutError:  # asyncpg terminated the connections when the wait was cut
            log.warning("postgresql connections did not close in time; dropped them",
                        extra={"seconds": PG_CLOSE_TIMEOUT})
