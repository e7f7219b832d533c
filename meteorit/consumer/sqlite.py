"""The SQLite sink: sqlite:///relative/path.db or sqlite:////absolute/path.db
[?timeout=SECONDS], the embedded default.

Owns: the events table in SQLite (id, type, ts, received_at, event; indexes on type and
received_at), its WAL and how a batch gets there. Must not touch: Redis.

WAL, synchronous=NORMAL, one transaction per batch, INSERT OR IGNORE on id. Rows go in
multi-row INSERTs of up to 512 rows run on a writer thread: one sqlite3_step inserts
them all with the GIL released, so decoding the next batch overlaps it. A new database
gets 16 KiB pages; every connection a 64 MB page cache (see PAGE_SIZE and CACHE_KIB).

The table is a rowid table with `id` as a separate unique index, not WITHOUT ROWID:
with meteorit's time-ordered ids the clustered layout ran 12% more instructions (its
secondary indexes carry the 36-character id instead of a rowid), and with clients'
random ids it would scatter the whole 250-byte rows over the table instead of the
narrow index entries.

Checkpoints run on a thread and connection of their own, every CHECKPOINT_BYTES of
records (PASSIVE: they never block the writer) instead of inside the writer's commits.
But a checkpoint beside a writer that never pauses never catches up with it, and the WAL
only starts again from its beginning once it is wholly checkpointed (a 1M drain left a
399 MB WAL): so once a checkpoint finds WAL_REWIND_BYTES in the WAL (or
REWIND_RECORD_BYTES of records were stored), the writer thread itself checkpoints the
rest between two batches (little: the other thread did the bulk), and the next batch
rewinds the WAL, which stays near 50 MB; journal_size_limit trims a file grown larger.

`timeout` is how long a writer waits for another process's write lock (default 5 s,
values.SQLITE_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from typing import Any

from ..values import SQLITE_TIMEOUT, check_table
from .rows import WIDTH, Rows
from .sink import SinkUnavailable, Written, refused

log = logging.getLogger("meteorit.sinks")

# A power of two; statement sizes are powers of two up to it. Profiled (callgrind, the
# same 100k rows): 512 rows per statement ran 6% fewer instructions than 8192, whose
# 40,960 bound values no longer fit the CPU's caches.
MAX_ROWS_PER_INSERT = 512
# A new database's page: a quarter of the WAL frames, pwrite()s and checkpoint copies of
# 4 KiB pages (1M events: the consumer's system time fell from 1.5 to 0.8 s).
PAGE_SIZE = 16384
# The page cache (KiB; SQLite's default is 2 MB). A batch dirties more than that: with
# clients' random ids every insert lands on another page of the primary key's index,
# and each page the cache drops is read back (1M random ids: 64 MB took the drain from
# 27 s to 19 s, its system time from 11 s to 4 s). Allocated as used.
CACHE_KIB = 65536
CHECKPOINT_BYTES = 4 << 20  # of records stored between PASSIVE checkpoints on their own thread
# The WAL starts again from its beginning once the last checkpoint found this much in it,
# or this much of records was stored since (the checkpoints may lag behind the writer)
WAL_REWIND_BYTES = 40 << 20
REWIND_RECORD_BYTES = 20 << 20
WAL_SIZE_LIMIT = 64 << 20  # journal_size_limit: the WAL file is cut to this when it rewinds
REWIND_WAIT_MS = 100  # for other connections' transactions to end before a rewind; else later
# Errors that mean "this row's data", not "the database": the batch goes in row by row.
SQLITE_ROW_ERRORS = (OverflowError, ValueError, sqlite3.DataError)


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
        self._checkpoint: asyncio.Future[int] | None = None
        self._since_checkpoint = 0  # bytes of records committed since the last checkpoint began
        self._wal_bytes = 0  # in the WAL since it last started again, as the last checkpoint saw
        self._since_rewind = 0  # bytes of records committed since the WAL last started again
        self._page_size = 4096
        self._largest = MAX_ROWS_PER_INSERT
        self._statements: dict[int, str] = {}

    async def open(self) -> None:
        await self._run(self._writer, self._open)

    async def write(self, rows: Rows) -> Written:
        try:
            written: Written = await self._run(self._writer, self._write, rows)
        except asyncio.CancelledError:  # given up on (a stop): do not let it hold the thread
            if self.db is not None:
                self.db.interrupt()
            raise
        size = sum(map(len, rows.records))
        self._since_checkpoint += size
        self._since_rewind += size
        if self._wal_bytes >= WAL_REWIND_BYTES or self._since_rewind >= REWIND_RECORD_BYTES:
            await self._rewind()
        elif self._since_checkpoint >= CHECKPOINT_BYTES and self._checkpoint is None:
            self._start_checkpoint()
        return written

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
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a new database only; set before WAL mode
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpoint thread does it
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        db.executescript(sqlite_schema(self.table))
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // WIDTH
        self._largest = min(MAX_ROWS_PER_INSERT, 1 << (limit.bit_length() - 1))
        self.db = db
        self.checkpoint_db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                             check_same_thread=False)
        log.info("sqlite sink open", extra={"path": os.path.abspath(self.path), "table": self.table})

    def _insert_sql(self, rows: int) -> str:
        # Plain `?`s: numbered ones (?NNN) cost SQLite's parser a scan of those before
        # each, 9 s to prepare 8192 rows.
        sql = self._statements.get(rows)
        if sql is None:
            sql = f"INSERT OR IGNORE INTO {self.table} VALUES " + ",".join(("(?,?,?,?,?)",) * rows)
            self._statements[rows] = sql
        return sql

    def _write(self, rows: Rows) -> Written:
        self._open()
        try:
            return Written(self._transaction(self._insert_all, rows), [])
        except SQLITE_ROW_ERRORS:  # some row's data: find which, store the others
            rejected: list[tuple[bytes, str]] = []
            return Written(self._transaction(self._insert_one_by_one, rows, rejected), rejected)

    def _transaction(self, insert: Callable[..., None], *args: Any) -> int:
        """Run insert(db, *args) in one write transaction; the rows it added."""
        db = self.db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            insert(db, *args)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return db.total_changes - before

    def _insert_all(self, db: sqlite3.Connection, rows: Rows) -> None:
        ids, types, ts, received_at, events = rows.ids, rows.types, rows.ts, rows.received_at, rows.events
        start = 0
        for count in _power_of_two_runs(len(rows), self._largest):
            end = start + count
            params = list(chain.from_iterable(zip(ids[start:end], types[start:end], ts[start:end],
                                                  received_at[start:end], events[start:end])))
            db.execute(self._insert_sql(count), params)  # statements are cached
            start = end

    def _insert_one_by_one(self, db: sqlite3.Connection, rows: Rows, rejected: list[tuple[bytes, str]]) -> None:
        sql = self._insert_sql(1)
        for i, record in enumerate(rows.records):
            try:
                db.execute(sql, rows.row(i))
            except SQLITE_ROW_ERRORS as exc:  # the statement failed alone; the transaction goes on
                rejected.append((record, refused("sqlite", exc)))

    def _checkpoint_rest(self) -> bool:
        """Checkpoint what the checkpoint thread left, between two batches; True when the
        next transaction will start the WAL again. RESTART holds off other writers (a second
        consumer) until then, but waits only REWIND_WAIT_MS for their transactions and for
        readers of old snapshots to end: a long query elsewhere must not stall the drain."""
        db = self.db
        assert db is not None
        db.execute(f"PRAGMA busy_timeout={REWIND_WAIT_MS}")
        try:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            db.execute(f"PRAGMA busy_timeout={round(self.timeout * 1000)}")
        return not busy

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

    async def _rewind(self) -> None:
        """Let the next batch start the WAL again from its beginning. Only the writer's own
        thread can checkpoint the WAL wholly (no batch is being written meanwhile), and
        that costs little: the checkpoint thread has done all but its last few batches (it
        takes no new work from here on; still at it, it is waited for one batch later).
        The batch is committed already: a failure here only means another try later."""
        if self._checkpoint is not None:
            if self._since_rewind < REWIND_RECORD_BYTES + CHECKPOINT_BYTES:
                return
            await asyncio.wait([self._checkpoint])
        try:
            rewound = await self._run(self._writer, self._checkpoint_rest)
        except SinkUnavailable as exc:
            log.warning("checkpoint failed", extra={"error": str(exc)})
            rewound = False
        self._wal_bytes = 0
        if rewound:
            self._since_rewind = self._since_checkpoint = 0
        else:  # busy elsewhere: more checkpoints on their thread meanwhile, another try later
            self._since_rewind = REWIND_RECORD_BYTES // 2

    def _start_checkpoint(self) -> None:
        self._since_checkpoint = 0
        future = asyncio.get_running_loop().run_in_executor(self._checkpointer, self._checkpoint_now)
        self._checkpoint = future
        future.add_done_callback(self._checkpoint_done)

    def _checkpoint_now(self) -> int:
        """PASSIVE checkpoint; the frames in the WAL (since it last started again)."""
        if self.checkpoint_db is None:
            return 0
        _, frames, _ = self.checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return max(0, int(frames))  # -1 when the database is not in WAL mode

    def _checkpoint_done(self, future: asyncio.Future[int]) -> None:
        self._checkpoint = None
        if future.cancelled():
            return
        if future.exception() is not None:
            log.warning("checkpoint failed", extra={"error": str(future.exception())})
        else:
            self._wal_bytes = future.result() * self._page_size

    @staticmethod
    async def _run(executor: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except sqlite3.Error as exc:  # locked, disk full, I/O error, read-only...
            raise SinkUnavailable(f"sqlite: {exc}") from exc
