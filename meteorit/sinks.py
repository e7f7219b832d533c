"""Sinks: where the consumer stores decoded batches. One `write` commits one batch whole.

Owns: the sink URLs, the events table (id, type, ts, received_at, event; indexes on type
and received_at) and how each database gets a batch in bulk. Must not touch: Redis.

    sqlite:///relative/path.db  sqlite:////absolute/path.db  [?timeout=SECONDS]
        WAL, synchronous=NORMAL, one transaction per batch, INSERT OR IGNORE on id.
        Rows go in multi-row INSERTs run on a writer thread: one sqlite3_step inserts
        thousands of rows with the GIL released, so decoding the next batch overlaps it.
        Checkpoints run on a thread and connection of their own (PASSIVE: they never
        block the writer) instead of inside the writer's commits. `timeout` is how long a
        writer waits for another process's write lock (default 5 s).
    postgresql://user@host:port/db  (or postgres://)
        asyncpg, binary COPY, `consumer.concurrency` connections committing in parallel.
        A batch is COPied straight into the table in one transaction; if an id is there
        already (a redelivered batch), it goes the other way: COPY into a temporary
        staging table, then INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING.
    ndjson:PATH  ndjson:-
        one record per line, appended (fsync per batch) or to stdout; redelivered
        batches are written again (at-least-once: dedupe by id when reading).

Errors: `SinkUnavailable` (retry later, nothing was stored) or, from `write`, rows the
database refuses as data (returned as rejected, for the dead-letter list).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson

from .errors import MeteoritError
from .rows import WIDTH, Rows

log = logging.getLogger("meteorit.sinks")

SQLITE_TIMEOUT = 5.0
MAX_ROWS_PER_INSERT = 8192  # a power of two; statement sizes are powers of two up to it
CHECKPOINT_EVERY = 1.0  # seconds between PASSIVE checkpoints while batches keep coming
PG_STAGING = "meteorit_staging"
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class SinkUnavailable(MeteoritError):
    """The sink cannot take a batch now (down, locked, full); nothing of it was stored."""


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


@dataclass(frozen=True)
class SinkUrl:
    kind: str  # "sqlite", "postgresql" or "ndjson"
    target: str  # a path, a DSN, or "-"
    timeout: float = SQLITE_TIMEOUT


def parse_sink_url(url: str) -> SinkUrl:
    """Check a sink URL; ValueError names what is wrong."""
    if url.startswith("sqlite:///"):
        path, _, query = url[len("sqlite:///"):].partition("?")
        if not path:
            raise ValueError(f"no database path in {url!r} (sqlite:///relative.db or sqlite:////abs.db)")
        params = parse_qs(query, strict_parsing=bool(query)) if query else {}
        unknown = set(params) - {"timeout"}
        if unknown:
            raise ValueError(f"unknown sqlite parameter {sorted(unknown)[0]!r} (known: timeout)")
        timeout = SQLITE_TIMEOUT
        if "timeout" in params:
            try:
                timeout = float(params["timeout"][-1])
            except ValueError:
                raise ValueError(f"timeout must be a number of seconds in {url!r}") from None
            if not timeout >= 0:
                raise ValueError(f"timeout must be >= 0 in {url!r}")
        return SinkUrl("sqlite", path, timeout)
    if url.startswith(("postgresql://", "postgres://")):
        return SinkUrl("postgresql", url)
    if url.startswith("ndjson:"):
        target = url[len("ndjson:"):]
        if not target:
            raise ValueError("ndjson needs a path or - (stdout): ndjson:/var/events.ndjson")
        return SinkUrl("ndjson", target)
    raise ValueError(f"unknown sink {url!r}: use sqlite:///PATH, postgresql://..., ndjson:PATH or ndjson:-")


def check_table(name: str) -> str:
    if not IDENTIFIER.match(name):
        raise ValueError(f"must be a plain SQL identifier (letters, digits, _), got {name!r}")
    return name


def open_sink(url: str, table: str, writers: int) -> Sink:
    spec = parse_sink_url(url)
    if spec.kind == "sqlite":
        return SqliteSink(spec.target, table, spec.timeout)
    if spec.kind == "postgresql":
        return PostgresSink(spec.target, table, writers)
    return NdjsonSink(spec.target)


# --- SQLite


def sqlite_schema(table: str) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, type TEXT NOT NULL, ts, "
            f"received_at INTEGER NOT NULL, event TEXT NOT NULL);\n"
            f"CREATE INDEX IF NOT EXISTS {table}_type ON {table}(type);\n"
            f"CREATE INDEX IF NOT EXISTS {table}_received_at ON {table}(received_at);\n")


def _power_of_two_runs(rows: int, largest: int) -> list[int]:
    """Split `rows` into statement sizes that are powers of two, largest first."""
    runs = []
    while rows:
        size = min(largest, 1 << (rows.bit_length() - 1))
        runs.append(size)
        rows -= size
    return runs


class SqliteSink:
    kind = "sqlite"
    writers = 1  # SQLite has one writer per database
    to_stdout = False

    def __init__(self, path: str, table: str, timeout: float = SQLITE_TIMEOUT) -> None:
        self.path = path
        self.table = check_table(table)
        self.timeout = timeout
        self.db: sqlite3.Connection | None = None
        self.checkpoint_db: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._checkpoint: asyncio.Future[None] | None = None
        self._last_checkpoint = time.monotonic()
        self._largest = MAX_ROWS_PER_INSERT
        self._statements: dict[int, str] = {}

    async def open(self) -> None:
        await self._run(self._writer, self._open)

    async def write(self, rows: Rows) -> Written:
        inserted = await self._run(self._writer, self._write, rows.columns)
        self._maybe_checkpoint()
        return Written(inserted, [])

    async def close(self) -> None:
        if self._checkpoint is not None:
            await asyncio.wait([self._checkpoint])
        await self._run(self._writer, self._close)
        self._writer.shutdown()
        self._checkpointer.shutdown()

    # runs on the writer thread

    def _open(self) -> None:
        if self.db is not None:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise SinkUnavailable(f"directory {directory} does not exist")
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpoint thread does it
        db.executescript(sqlite_schema(self.table))
        limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // WIDTH
        self._largest = min(MAX_ROWS_PER_INSERT, 1 << (limit.bit_length() - 1))
        self.db = db
        self.checkpoint_db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                             check_same_thread=False)
        log.info("sqlite sink open", extra={"path": os.path.abspath(self.path), "table": self.table})

    def _insert_sql(self, rows: int) -> str:
        sql = self._statements.get(rows)
        if sql is None:
            sql = f"INSERT OR IGNORE INTO {self.table} VALUES " + ",".join(("(?,?,?,?,?)",) * rows)
            self._statements[rows] = sql
        return sql

    def _write(self, columns: list[Any]) -> int:
        self._open()
        db = self.db
        assert db is not None
        before = db.total_changes
        db.execute("BEGIN IMMEDIATE")
        try:
            offset = 0
            for rows in _power_of_two_runs(len(columns) // WIDTH, self._largest):
                end = offset + rows * WIDTH
                db.execute(self._insert_sql(rows), columns[offset:end])  # statements are cached
                offset = end
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return db.total_changes - before

    def _close(self) -> None:
        if self.db is not None:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("final checkpoint failed", extra={"error": str(exc)})
            self.db.close()
            self.db = None
        if self.checkpoint_db is not None:
            self.checkpoint_db.close()
            self.checkpoint_db = None

    # checkpoints

    def _maybe_checkpoint(self) -> None:
        now = time.monotonic()
        if self._checkpoint is not None or now - self._last_checkpoint < CHECKPOINT_EVERY:
            return
        self._last_checkpoint = now
        future = asyncio.get_running_loop().run_in_executor(self._checkpointer, self._checkpoint_now)
        self._checkpoint = future
        future.add_done_callback(self._checkpoint_done)

    def _checkpoint_now(self) -> None:
        if self.checkpoint_db is not None:
            self.checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _checkpoint_done(self, future: asyncio.Future[None]) -> None:
        self._checkpoint = None
        if not future.cancelled() and future.exception() is not None:
            log.warning("checkpoint failed", extra={"error": str(future.exception())})

    @staticmethod
    async def _run(executor: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except sqlite3.Error as exc:  # locked, disk full, I/O error, read-only...
            raise SinkUnavailable(f"sqlite: {exc}") from exc


# --- PostgreSQL


def pg_tuples(columns: list[Any]) -> list[tuple[Any, ...]]:
    """Flat columns as row tuples for COPY; `ts` goes in a text column, so numbers become text."""
    rows = list(zip(*[iter(columns)] * WIDTH))
    if any(ts is not None and type(ts) is not str for ts in columns[2::WIDTH]):
        rows = [(i, t, ts if ts is None or type(ts) is str else orjson.dumps(ts).decode(), r, e)
                for i, t, ts, r, e in rows]
    return rows


class PostgresSink:
    kind = "postgresql"
    to_stdout = False

    def __init__(self, dsn: str, table: str, writers: int) -> None:
        self.dsn = dsn
        self.table = check_table(table)
        self.writers = writers
        self.pool: Any = None
        self.insert = f"INSERT INTO {self.table} SELECT * FROM {PG_STAGING} ON CONFLICT (id) DO NOTHING"

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
            conn = await asyncpg.connect(self.dsn)
            try:
                async with conn.transaction():
                    # two consumers starting at once must not both create the table
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"meteorit:{self.table}")
                    await conn.execute(self.schema())
            finally:
                await conn.close()
            self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.writers, init=self._staging)
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
        tuples = pg_tuples(rows.columns)
        try:
            async with self.pool.acquire() as conn:
                try:
                    return Written(await self._copy(conn, tuples), [])
                except asyncpg.DataError:
                    return await self._write_one_by_one(conn, tuples, rows.records)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise SinkUnavailable(f"postgresql: {exc}") from exc

    async def _copy(self, conn: Any, tuples: list[tuple[Any, ...]]) -> int:
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

    async def _write_one_by_one(self, conn: Any, tuples: list[tuple[Any, ...]], records: list[bytes]) -> Written:
        """A row PostgreSQL refuses as data (a NUL in a text column) must not hold up the batch."""
        import asyncpg
        inserted = 0
        rejected = []
        for row, record in zip(tuples, records):
            try:
                inserted += await self._copy(conn, [row])
            except asyncpg.DataError as exc:
                rejected.append((record, f"postgresql refused it: {exc}"))
        return Written(inserted, rejected)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


# --- NDJSON


class NdjsonSink:
    kind = "ndjson"
    writers = 1

    def __init__(self, target: str) -> None:
        self.target = target
        self.to_stdout = target == "-"
        self._file: Any = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ndjson-writer")

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        if self._file is None:
            self._file = sys.stdout.buffer if self.to_stdout else open(self.target, "ab")

    async def write(self, rows: Rows) -> Written:
        await self._run(self._write, rows.records)
        return Written(len(rows.records), [])

    def _write(self, records: list[bytes]) -> None:
        self._open()
        data = b"\x00".join(records)
        if b"\n" in data or b"\r" in data:  # one record per line: compact what is spread out
            data = b"\x00".join(orjson_compact(r) for r in records)
        self._file.write(data.replace(b"\x00", b"\n") + b"\n")
        self._file.flush()
        if not self.to_stdout:
            os.fsync(self._file.fileno())

    async def close(self) -> None:
        if self._file is not None and not self.to_stdout:
            await self._run(self._file.close)
        self._thread.shutdown()

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except OSError as exc:
            raise SinkUnavailable(f"ndjson: {exc}") from exc


def orjson_compact(record: bytes) -> bytes:
    return orjson.dumps(orjson.loads(record))
