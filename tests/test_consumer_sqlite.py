"""The SQLite sink's file layout: a database it creates gets 16 KiB pages; one that
exists keeps its own and takes batches as before. Read back with a connection of the
test's own, as a user would."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from meteorit.consumer import rows as rowslib
from meteorit.consumer.sqlite import PAGE_SIZE, SqliteSink


def records(first: int, n: int) -> list[bytes]:
    return [b'{"type":"t","id":"%d","received_at":%d,"ts":%d}' % (i, 1000 + i, i) for i in range(first, first + n)]


def store(path: Path, *batches: list[bytes]) -> list[int]:
    """Each batch through a sink of its own; the rows each inserted."""
    async def run() -> list[int]:
        sink = SqliteSink(str(path), "events")
        await sink.open()
        try:
            return [(await sink.write(rowslib.decode(batch))).inserted for batch in batches]
        finally:
            await sink.close()

    return asyncio.run(run())


def page_size(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA page_size").fetchone()[0]


def test_a_new_database_gets_16k_pages_and_every_row(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    # 1300 rows: statements of 512, 256, 16 and 4 rows, each with its own bound values
    assert store(db, records(0, 1300), records(1000, 400)) == [1300, 100]
    assert page_size(db) == PAGE_SIZE == 16384
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, type, ts, received_at, event FROM events ORDER BY received_at").fetchall()
    assert len(rows) == 1400
    assert rows[0] == ("0", "t", 0, 1000, records(0, 1)[0].decode())
    assert rows[-1] == ("1399", "t", 1399, 2399, records(1399, 1)[0].decode())


def test_an_existing_database_keeps_its_page_size_and_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA page_size=4096")
        conn.execute("CREATE TABLE other (x)")  # the file exists with 4 KiB pages
    assert store(db, records(0, 700)) == [700]
    assert store(db, records(500, 700)) == [500]  # 200 of them were there: skipped
    assert page_size(db) == 4096
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM events").fetchone() == (1200, 1200)
