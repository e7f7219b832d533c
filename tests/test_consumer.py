"""meteorit-consumer end to end: real redis-server, real consumer processes, real SQLite
files, NDJSON files and (where installed) a real PostgreSQL server; kill -9, TERM and
SCRIPT FLUSH for real. Every assertion is what a user sees: rows, lists, exit codes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import resource
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import pytest
import redis as redislib
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import Meteorit, RedisServer, kill_group, wait_until
from consumer_process import CONSUMER, EXIT_TIMEOUT, QUEUE, Consumer
from pg_server import PostgresServer, pg_bin_dir

from meteorit.consumer import rows as rowslib
from meteorit.consumer.batches import BatchQueue
from meteorit.record import IdGenerator
from meteorit.record import encode as records
from meteorit.consumer.postgresql import PostgresSink
from meteorit.consumer.sink import Written
from meteorit.consumer.sqlite import SqliteSink

DEAD = "meteorit:dead"


def make_records(n: int, start: int = 0) -> list[bytes]:
    """Queue records as meteorit's workers build them (ids, received_at), ~200 bytes."""
    ids = IdGenerator()
    out: list[bytes] = []
    for first in range(start, start + n, 1000):
        events = [{"type": ("pageview", "click", "open")[i % 3], "url": f"https://example.com/p/{i}",
                   "ref": "https://www.example.org/", "n": i, **({"ts": i} if i % 2 else {})}
                  for i in range(first, min(first + 1000, start + n))]
        out += records(events, int(time.time() * 1000), ids, 65536)[0]
    return out


def fill(client: redislib.Redis, recs: list[bytes], queue: str = QUEUE) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(recs), 5000):
        pipe.rpush(queue, *recs[i:i + 5000])
    pipe.execute()


def ids_of(recs: list[bytes]) -> set[str]:
    return {orjson.loads(r)["id"] for r in recs}


def in_flight_keys(client: redislib.Redis) -> list[bytes]:
    return client.keys(f"{QUEUE}:batch:*")


@pytest.fixture
def consumers(tmp_path: Path, redis: redislib.Redis,
              redis_server: RedisServer) -> Iterator[Callable[..., Consumer]]:
    started: list[Consumer] = []

    def make(sink: str, name: str = "c1", **consumer: Any) -> Consumer:
        c = Consumer(tmp_path, name, redis_server.url, sink, **consumer)
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


def sqlite_rows(path: Path) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=10) as db:
        try:
            return db.execute("SELECT id, type, ts, received_at, event FROM events").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


def sqlite_count(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path, timeout=10) as db:
        try:
            return db.execute("SELECT count(*) FROM events").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def assert_nothing_in_flight(client: redislib.Redis) -> None:
    assert client.llen(QUEUE) == 0
    assert in_flight_keys(client) == []
    assert client.keys(f"{QUEUE}:inflight:*") == []


# --- SQLite and NDJSON


def test_once_stores_every_event_exactly_and_prints_a_summary(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    recs = make_records(25_000)
    fill(redis, recs)
    c = consumers("sqlite:///events.db", batch=4000)
    assert c.run_once() == 0
    rows = sqlite_rows(tmp_path / "events.db")
    assert len(rows) == len(recs)
    by_id = {r[0]: r for r in rows}
    assert set(by_id) == ids_of(recs)
    for rec in recs[:50] + recs[-50:]:
        event = orjson.loads(rec)
        ident, kind, ts, received_at, stored = by_id[event["id"]]
        assert (kind, ts, received_at) == (event["type"], event.get("ts"), event["received_at"])
        assert stored == rec.decode()  # the record's own bytes, not re-serialised
    assert_nothing_in_flight(redis)
    assert redis.scard(f"{QUEUE}:consumers") == 0  # unregistered at exit
    assert "stored 25000 events in 7 batches, 0 duplicates skipped, 0 dead letters" in c.stdout()
    with sqlite3.connect(tmp_path / "events.db") as db:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"events_type", "events_received_at"} <= indexes
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_batch_delivered_twice_is_stored_once(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    recs = make_records(3000)
    fill(redis, recs)
    assert consumers("sqlite:///events.db", name="first").run_once() == 0
    fill(redis, recs[:2000])  # as a recovered batch would come back
    again = consumers("sqlite:///events.db", name="again")
    assert again.run_once() == 0
    assert sqlite_count(tmp_path / "events.db") == 3000
    assert "stored 0 events in 1 batches, 2000 duplicates skipped" in again.stdout()


def test_ndjson_file_and_stdout_get_one_record_per_line(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    recs = make_records(5000)
    fill(redis, recs)
    assert consumers("ndjson:out.ndjson", name="file", batch=1500).run_once() == 0
    assert (tmp_path / "out.ndjson").read_bytes() == b"".join(r + b"\n" for r in recs)
    fill(redis, recs[:10])
    to_stdout = consumers("ndjson:-", name="stdout")
    assert to_stdout.run_once() == 0
    assert to_stdout.stdout() == "".join(r.decode() + "\n" for r in recs[:10])  # the summary is on stderr
    assert "stored 10 events" in to_stdout.log_path.read_text()


def test_kill_9_between_pop_and_commit_loses_nothing_and_stores_nothing_twice(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    recs = make_records(150_000)
    fill(redis, recs)
    db = tmp_path / "events.db"
    victim = consumers("sqlite:///events.db", name="victim", batch=1000, concurrency=8).start()
    wait_until(lambda: sqlite_count(db) >= 10_000, 30, "the first batches stored")
    assert victim.proc is not None
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.wait()
    # it died holding popped batches that were not committed, or not acknowledged
    held = in_flight_keys(redis)
    assert held, "the kill should land while batches are in flight"
    assert sqlite_count(db) < len(recs)
    after = consumers("sqlite:///events.db", name="after")
    assert after.run_once() == 0
    assert after.logs("recovered the in-flight batches of consumers that are gone")
    rows = sqlite_rows(db)
    assert len(rows) == len(recs) and {r[0] for r in rows} == ids_of(recs)
    assert_nothing_in_flight(redis)
    assert redis.scard(f"{QUEUE}:consumers") == 0


def test_term_finishes_the_batches_in_hand_then_exits_0(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    recs = make_records(150_000)
    fill(redis, recs)
    db = tmp_path / "events.db"
    c = consumers("sqlite:///events.db", batch=1000, concurrency=4).start()
    wait_until(lambda: sqlite_count(db) >= 5000, 30, "the first batches stored")
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait() == 0
    stored = sqlite_count(db)
    assert 0 < stored < len(recs)
    assert stored + redis.llen(QUEUE) == len(recs)  # every batch in hand was stored and acknowledged
    assert in_flight_keys(redis) == [] and redis.scard(f"{QUEUE}:consumers") == 0
    assert consumers("sqlite:///events.db", name="rest").run_once() == 0
    assert sqlite_count(db) == len(recs)


def test_a_flushed_script_cache_is_reloaded(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    c = consumers("sqlite:///events.db").start()
    recs = make_records(4000)
    fill(redis, recs[:2000])
    wait_until(lambda: sqlite_count(db) == 2000, 20, "the first half stored")
    redis.script_flush()
    fill(redis, recs[2000:])
    wait_until(lambda: sqlite_count(db) == 4000, 20, "the second half stored after SCRIPT FLUSH")
    assert c.logs("script cache lost; loading the script again")
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait() == 0
    assert {r[0] for r in sqlite_rows(db)} == ids_of(recs)


def test_poison_records_go_to_the_dead_letter_list_with_the_reason(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    good = make_records(100)
    poison = {
        b"not json at all": "not valid JSON",
        b"[1, 2, 3]": "not a JSON object but list",
        b'{"type": "a", "received_at": 1}': "\"id\" must be a non-empty string",
        b'{"id": "x1", "type": 5, "received_at": 1}': "\"type\" must be a non-empty string",
        b'{"id": "x2", "type": "a", "received_at": "soon"}': "\"received_at\" must be an integer",
        b'{"id": "x3", "type": "a", "received_at": 1, "ts": [1]}': "\"ts\" must be a number or a string",
        b"\xff\xfe{binary": "not valid JSON",
    }
    mixed = good[:50] + list(poison) + good[50:]
    fill(redis, mixed)
    c = consumers("sqlite:///events.db", batch=30)
    assert c.run_once() == 0
    assert sqlite_count(tmp_path / "events.db") == 100
    entries = [json.loads(e) for e in redis.lrange(DEAD, 0, -1)]
    assert len(entries) == len(poison)
    by_record = {e.get("record", "").encode() if "record" in e else b"\xff\xfe{binary": e for e in entries}
    for record, reason in poison.items():
        assert reason in by_record[record]["reason"], (record, by_record[record])
        assert by_record[record]["consumer"].startswith("c1:")
    assert_nothing_in_flight(redis)
    assert "7 dead letters" in c.stdout()


def test_two_consumers_at_once_store_every_event_once(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    recs = make_records(100_000)
    fill(redis, recs)
    a = consumers("sqlite:///events.db", name="a", batch=250).start("--once")
    b = consumers("sqlite:///events.db", name="b", batch=250).start("--once")
    assert a.wait() == 0 and b.wait() == 0
    assert {r[0] for r in sqlite_rows(tmp_path / "events.db")} == ids_of(recs)
    assert sqlite_count(tmp_path / "events.db") == len(recs)
    stored = [c.logs("consumer stopped")[0]["stored"] for c in (a, b)]
    assert sum(stored) == len(recs) and min(stored) > 0  # both took part
    assert_nothing_in_flight(redis)


def test_sqlite_locked_retries_with_backoff_and_loses_nothing(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    c = consumers("sqlite:///events.db?timeout=0.1").start()
    wait_until(lambda: c.logs("sqlite sink open"), 20, "the sink open")
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the database
        recs = make_records(3000)
        fill(redis, recs)
        wait_until(lambda: [e for e in c.logs("cannot store a batch; retrying with backoff")], 20,
                   "the consumer to meet the lock")
        assert c.alive()
        assert redis.llen(QUEUE) + sum(redis.llen(k) for k in in_flight_keys(redis)) == 3000
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_until(lambda: sqlite_count(db) == 3000, 20, "every event stored after the lock went")
    # logged once the commit returns to the event loop: a moment after the rows show
    wait_until(lambda: c.logs("can store a batch again"), 20, "the recovery logged")
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait() == 0
    assert_nothing_in_flight(redis)


def test_redis_down_then_restarted_the_consumer_stays_up_and_goes_on(
        consumers: Callable[..., Consumer], redis: redislib.Redis, redis_server: RedisServer,
        tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    c = consumers("sqlite:///events.db").start()
    recs = make_records(2000)
    fill(redis, recs[:1000])
    wait_until(lambda: sqlite_count(db) == 1000, 20, "the first events stored")
    redis_server.stop()
    wait_until(lambda: c.logs("cannot pop a batch; retrying with backoff"), 20, "the consumer to see Redis gone")
    assert c.alive()
    redis_server.start()  # empty, and without the scripts
    fill(redis, recs[1000:])
    wait_until(lambda: sqlite_count(db) == 2000, 30, "the events pushed after the restart stored")
    assert c.logs("can pop a batch again")
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait() == 0


def test_embedded_redis_is_reached_through_its_socket(tmp_path: Path) -> None:
    """redis.url = "embedded": the consumer connects to the socket under redis.data_dir."""
    data_dir = tmp_path / "var" / "redis"
    data_dir.mkdir(parents=True)
    socket_path = data_dir / "redis.sock"
    server = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(socket_path), "--save", "",
                               "--appendonly", "no", "--dir", str(data_dir)],
                              stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        client = redislib.Redis(unix_socket_path=str(socket_path))

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redislib.RedisError:
                return False

        wait_until(answers, 20, "the embedded-style redis-server")
        recs = make_records(1000)
        fill(client, recs)
        config = tmp_path / "embedded.toml"
        config.write_text('[redis]\nurl = "embedded"\ndata_dir = "var/redis"\n'
                          '[consumer]\nsink = "sqlite:///events.db"\n')
        out = subprocess.run([*CONSUMER, "-c", str(config), "--once"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=EXIT_TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert sqlite_count(tmp_path / "events.db") == 1000 and client.llen(QUEUE) == 0
    finally:
        kill_group(server)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[consumer]\nsink = "mysql://db"\n')
    out = subprocess.run([*CONSUMER, "-c", str(bad), "--once"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "config error: consumer.sink: unknown sink 'mysql://db'" in out.stderr
    out = subprocess.run([*CONSUMER, "-c", str(bad), "--sink", "sqlite:///x.db?timeout=soon"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "timeout must be a number" in out.stderr


# --- records no database column takes, sinks that hang or go away, and what the counters say

RECEIVED = 1_795_000_000_000


def crafted(ident: str, **fields: Any) -> bytes:
    """A queue record with fields set by hand (orjson writes integers up to 2**64 - 1)."""
    return orjson.dumps({"id": ident, "type": "t", "received_at": RECEIVED, **fields})


def dead_reasons(client: redislib.Redis) -> dict[str, str]:
    """id (or the record, when it has none) -> reason, of every dead letter."""
    found = {}
    for raw in client.lrange(DEAD, 0, -1):
        entry = json.loads(raw)
        found[str(json.loads(entry["record"]).get("id"))] = entry["reason"]
    return found


def test_a_ts_beyond_64_bits_sent_to_the_api_is_stored_with_a_null_ts_and_blocks_nothing(
        meteorit: Meteorit, consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    """The HTTP API takes any integer ts; no database column takes one beyond 64 bits (SQLite
    raised OverflowError on every start). The event is stored, ts NULL, the event as sent."""
    assert meteorit.post([{"type": "huge", "ts": 2**63}, {"type": "huge", "ts": 2**64 - 1},
                          {"type": "lowest", "ts": -2**63}]) == (202, {"accepted": 3})
    recs = make_records(100)
    odd = [crafted("late", received_at=2**63), crafted("i" * 129), crafted("long-type", type="t" * 257)]
    fill(redis, recs[:50] + odd + recs[50:])
    c = consumers("sqlite:///events.db", batch=40)
    assert c.run_once() == 0
    by_type: dict[str, list[tuple[Any, ...]]] = {}
    for row in sqlite_rows(tmp_path / "events.db"):
        by_type.setdefault(row[1], []).append(row)
    assert sorted(json.loads(r[4])["ts"] for r in by_type["huge"]) == [2**63, 2**64 - 1]  # the event as sent
    assert [r[2] for r in by_type["huge"]] == [None, None]
    assert [r[2] for r in by_type["lowest"]] == [-2**63]
    assert sum(len(v) for v in by_type.values()) == 103
    reasons = dead_reasons(redis)
    assert set(reasons) == {"late", "i" * 129, "long-type"}
    assert "\"received_at\" is out of the 64-bit range" in reasons["late"]
    assert "\"id\" is longer than 128 characters" in reasons["i" * 129]
    assert "\"type\" is longer than 256 characters" in reasons["long-type"]
    assert "stored 103 events" in c.stdout() and "3 dead letters" in c.stdout()
    assert_nothing_in_flight(redis)


def refusable_rows() -> tuple[rowslib.Rows, bytes, bytes]:
    """Rows as the decoder would hand them over if it let through what databases refuse:
    a received_at beyond 64 bits, and an id too large for a PostgreSQL index entry
    (random text: PostgreSQL would compress a repetitive one below the limit)."""
    rows = rowslib.decode(make_records(10))
    late = crafted("late", received_at=2**63)
    wide_id = base64.b64encode(random.Random(7).randbytes(3000)).decode()
    wide = crafted(wide_id)
    for record, values in ((late, ("late", "t", None, 2**63)), (wide, (wide_id, "t", None, RECEIVED))):
        rows.add(*values, record)
    return rows, late, wide


def test_sqlite_sink_stores_a_batch_row_by_row_when_some_row_is_refused(tmp_path: Path) -> None:
    rows, late, _ = refusable_rows()
    sink = SqliteSink(str(tmp_path / "events.db"), "events")

    async def write() -> Written:
        await sink.open()
        try:
            return await sink.write(rows)
        finally:
            await sink.close()

    written = asyncio.run(write())
    assert written.inserted == 11  # SQLite has no limit on an index entry: the wide id is stored
    assert [record for record, _ in written.rejected] == [late]
    assert "sqlite refused it: OverflowError" in written.rejected[0][1]
    assert sqlite_count(tmp_path / "events.db") == 11


def test_sqlite_wal_stays_bounded_during_a_long_drain(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    """A PASSIVE checkpoint beside a writer that never pauses never catches up: the WAL grew
    by about twice the records' size (a 1M drain left 399 MB). Now it rewinds every 20 MB
    of records (or 40 MB of WAL) and stays under 50 MB however long the drain."""
    recs = make_records(250_000)  # 52 MB of records: the WAL grew to 90 MB
    fill(redis, recs)
    wal = tmp_path / "events.db-wal"
    c = consumers("sqlite:///events.db", batch=2000).start()
    largest = 0

    def drained() -> bool:
        nonlocal largest
        if wal.exists():
            largest = max(largest, wal.stat().st_size)
        return not redis.llen(QUEUE) and not in_flight_keys(redis)

    wait_until(drained, 60, "the queue drained")
    largest = max(largest, wal.stat().st_size)  # the file only shrinks when the WAL rewinds
    assert sqlite_count(tmp_path / "events.db") == len(recs)
    assert 0 < largest < 64 * 2**20, f"the WAL grew to {largest / 2**20:.0f} MB"
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait() == 0


def test_term_during_start_up_is_a_stop_not_a_kill(tmp_path: Path, redis_server: RedisServer) -> None:
    """The config is a FIFO: the consumer is held in main(), reading it, when TERM comes."""
    fifo = tmp_path / "consumer.toml"
    os.mkfifo(fifo)
    proc = subprocess.Popen([*CONSUMER, "-c", str(fifo), "--once"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        def open_for_writing() -> int | None:  # succeeds once the consumer opens it to read
            try:
                return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return None

        fd = wait_until(open_for_writing, 20, "the consumer to open its config")
        proc.send_signal(signal.SIGTERM)
        os.write(fd, f'[redis]\nurl = "{redis_server.url}"\n[consumer]\nsink = "sqlite:///events.db"\n'.encode())
        os.close(fd)
        out, err = proc.communicate(timeout=EXIT_TIMEOUT)
        assert proc.returncode == 0, err
        assert b"stored 0 events" in out
    finally:
        kill_group(proc)


def test_ndjson_stdout_closed_by_its_reader_stops_the_consumer_with_exit_1(
        consumers: Callable[..., Consumer], redis: redislib.Redis) -> None:
    """`meteorit-consumer --sink ndjson:- | head -1`: once head is gone nothing can ever be
    written there; retrying forever would hold the batch and the queue."""
    fill(redis, make_records(20_000))  # 4 MB: more than a pipe holds
    c = consumers("ndjson:-", batch=500).start(stdout=subprocess.PIPE)
    assert c.proc is not None and c.proc.stdout is not None
    assert json.loads(c.proc.stdout.readline())["id"]
    c.proc.stdout.close()
    assert c.wait() == 1
    assert "stdout is closed" in c.logs("the sink can take nothing more; stopping")[0]["error"]
    assert in_flight_keys(redis) == [] and redis.llen(QUEUE) > 0  # what it held went back


def ndjson_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "a torn last line"
    return [json.loads(line)["id"] for line in data.splitlines()]


def small_files() -> None:
    """In the consumer's child: files it writes stop at 300 kB (write fails with EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_ndjson_file_full_mid_batch_leaves_no_torn_line_and_no_half_batch_twice(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    recs = make_records(3000)  # ~210 bytes each: the second batch of 1000 fills the file
    fill(redis, recs)
    out = tmp_path / "out.ndjson"
    c = consumers("ndjson:out.ndjson", batch=1000, stats_interval=5.0).start(limits=small_files)
    wait_until(lambda: c.logs("cannot store a batch; retrying with backoff"), 20, "the file to fill up")
    assert "File too large" in c.logs("cannot store a batch; retrying with backoff")[0]["error"]
    assert ndjson_lines(out) == [orjson.loads(r)["id"] for r in recs[:1000]]  # cut back to whole batches
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: c.logs("stopping: finishing the batches in hand"), 20, "the stop to begin")
    c.proc.send_signal(signal.SIGTERM)  # the file stays full: give up on the batches in hand
    assert c.wait() == 1
    assert consumers("ndjson:out.ndjson", name="roomy").run_once() == 0
    assert ndjson_lines(out) == [orjson.loads(r)["id"] for r in recs]  # each once, in order


def test_dead_letters_of_a_batch_another_consumer_recovered_are_not_counted(
        consumers: Callable[..., Consumer], redis: redislib.Redis, redis_server: RedisServer,
        tmp_path: Path) -> None:
    """A consumer stalled past its lease: another recovered its batch (and files its dead
    letters). Its own late ack removes nothing, so it filed no dead letter: none counted."""
    db = tmp_path / "events.db"
    c = consumers("sqlite:///events.db?timeout=0.05").start()
    wait_until(lambda: c.logs("sqlite sink open"), 20, "the sink open")
    assert c.proc is not None
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the batch stays in hand, retried
        fill(redis, make_records(10) + [b"poison"])
        wait_until(lambda: c.logs("cannot store a batch; retrying with backoff"), 20, "the consumer to meet the lock")
        os.killpg(c.proc.pid, signal.SIGSTOP)
        wait_until(lambda: not redis.keys(f"{QUEUE}:lease:*"), 20, "its lease to expire")

        async def recover_elsewhere() -> tuple[int, int]:
            client = redislib.asyncio.Redis.from_url(redis_server.url)
            try:
                return await BatchQueue(client, QUEUE, DEAD, "other", lease=10).recover()
            finally:
                await client.aclose()

        assert asyncio.run(recover_elsewhere()) == (1, 11)
        redis.delete(QUEUE)  # the other consumer took the batch and stored it
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        os.killpg(c.proc.pid, signal.SIGCONT)
    wait_until(lambda: c.logs("a batch was recovered by another consumer before its ack; it is stored again "
                              "from the queue (duplicates skipped)"), 20, "the late ack")
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait() == 0
    assert redis.llen(DEAD) == 0
    assert c.logs("consumer stopped")[0]["dead_letters"] == 0
    assert not c.logs("records sent to the dead-letter list")


def test_lag_reads_0_once_the_queue_is_drained(
        consumers: Callable[..., Consumer], redis: redislib.Redis) -> None:
    hour_ago = int(time.time() * 1000) - 3_600_000
    fill(redis, [orjson.dumps({"id": f"old-{i}", "type": "t", "received_at": hour_ago}) for i in range(100)])
    c = consumers("sqlite:///events.db").start()

    def caught_up() -> list[dict[str, Any]]:
        return [e for e in c.logs("progress") if e["stored"] == 100 and e["queue_depth"] == 0]

    wait_until(caught_up, 20, "a progress line after the drain")
    assert caught_up()[0]["lag_s"] == 0
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait() == 0


def test_an_id_sent_twice_is_stored_once_and_logged_at_debug_with_the_id(
        consumers: Callable[..., Consumer], redis: redislib.Redis, tmp_path: Path) -> None:
    body = {"type": "purchase", "card": "body-marker-4242"}
    fill(redis, [orjson.dumps({**body, "id": "order-17", "received_at": RECEIVED}),
                 orjson.dumps({**body, "id": "order-17", "received_at": RECEIVED + 1})])
    c = consumers("sqlite:///events.db", log_level="debug")
    assert c.run_once() == 0
    assert [r[3] for r in sqlite_rows(tmp_path / "events.db")] == [RECEIVED]  # the first one
    assert "stored 1 events in 1 batches, 1 duplicates skipped" in c.stdout()
    skipped = c.logs("events skipped: their id is stored already")
    assert skipped and skipped[0]["level"] == "debug" and skipped[0]["ids_repeated_in_batch"] == ["order-17"]
    assert not [e for e in c.logs() if e["level"] != "debug" and "body-marker" in json.dumps(e)]


# --- the Redis side alone: order of recovered batches, and the rows decoder


def test_recovered_batches_go_back_to_the_head_in_their_original_order(
        redis: redislib.Redis, redis_server: RedisServer) -> None:
    fill(redis, [b"%d" % i for i in range(10)])

    async def scenario() -> list[bytes]:
        client = redislib.asyncio.Redis.from_url(redis_server.url)
        try:
            gone = BatchQueue(client, QUEUE, DEAD, "gone", lease=0.2)
            first, second = await gone.pop(3), await gone.pop(3)
            assert first is not None and second is not None
            assert (first.records, second.records) == ([b"0", b"1", b"2"], [b"3", b"4", b"5"])
            await client.rpush(QUEUE, b"10")  # the queue goes on while they are in flight
            alive = BatchQueue(client, QUEUE, DEAD, "alive", lease=10)
            assert await alive.recover() == (0, 0)  # the lease still holds
            while await client.exists(gone.lease_key):
                await asyncio.sleep(0.05)
            assert await alive.recover() == (1, 6)
            return await client.lrange(QUEUE, 0, -1)
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [b"%d" % i for i in range(11)]
    assert redis.keys(f"{QUEUE}:*") == []


def test_decode_reads_the_columns_and_keeps_the_record_bytes() -> None:
    recs = [b'{"type":"a","id":"1","received_at":5}', b'{"type":"b","id":"2","received_at":7,"ts":"2026"}',
            b'{"type":"c","id":"3","received_at":6,"ts":1.5}', b"{", b'{"type":"d","id":"","received_at":1}']
    rows = rowslib.decode(recs)
    assert rows.columns == ["1", "a", None, 5, recs[0].decode(), "2", "b", "2026", 7, recs[1].decode(),
                            "3", "c", 1.5, 6, recs[2].decode()]
    assert rows.records == recs[:3] and rows.newest_received_at == 7
    assert [r for r, _ in rows.dead] == recs[3:]
    entry = json.loads(rowslib.dead_letter(b"\xff", "not valid JSON", "c"))
    assert entry["record_b64"] == "/w==" and entry["reason"] == "not valid JSON"


json_scalars = st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
       ident=st.text(min_size=1, max_size=40), kind=st.text(min_size=1, max_size=20),
       received_at=st.integers(0, 2**62), ts=st.none() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=30))
def test_decode_round_trips_any_valid_record(extra: dict[str, Any], ident: str, kind: str, received_at: int,
                                             ts: Any) -> None:
    event = {**extra, "id": ident, "type": kind, "received_at": received_at}
    event.pop("ts", None)  # from `extra`: not necessarily a valid one
    if ts is not None:
        event["ts"] = ts
    record = orjson.dumps(event)
    rows = rowslib.decode([record])
    assert rows.dead == []
    stored_ts = None if type(ts) is int and ts > 2**63 - 1 else ts  # no column takes it: NULL
    assert rows.columns == [ident, kind, stored_ts, received_at, record.decode()]


@settings(max_examples=200, deadline=None)
@given(received_at=st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False),
       ident=st.text(min_size=1, max_size=140), kind=st.text(min_size=1, max_size=270))
def test_decode_takes_what_every_database_takes_and_says_why_not(received_at: Any, ident: str, kind: str) -> None:
    record = orjson.dumps({"id": ident, "type": kind, "received_at": received_at})
    rows = rowslib.decode([record])
    storable = (type(received_at) is int and received_at <= 2**63 - 1 and len(ident) <= 128 and len(kind) <= 256)
    assert len(rows.records) == storable and len(rows.dead) == (not storable)
    if rows.dead:
        assert rows.dead[0][1] == rowslib.rejection(record) != "not storable"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60) | json_values.map(orjson.dumps), max_size=8))
def test_decode_sorts_every_record_into_rows_or_dead_letters(recs: list[bytes]) -> None:
    rows = rowslib.decode(recs)
    assert len(rows.records) + len(rows.dead) == len(recs)
    assert len(rows.columns) == rowslib.WIDTH * len(rows.records)
    assert all(reason for _, reason in rows.dead)


# --- PostgreSQL: a server of our own (CI installs postgresql; locally they skip without it)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs it (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg(postgres: PostgresServer) -> PostgresServer:
    postgres.psql("DROP TABLE IF EXISTS events")
    return postgres


def pg_ids(pg: PostgresServer) -> list[str]:
    out = pg.psql("SELECT id FROM events")
    return out.splitlines() if out else []


def test_postgresql_kill_9_restart_and_a_second_consumer_store_every_event_once(
        consumers: Callable[..., Consumer], redis: redislib.Redis, pg: PostgresServer) -> None:
    recs = make_records(150_000)
    fill(redis, recs)
    victim = consumers(pg.dsn, name="victim", batch=1000, concurrency=4).start()
    wait_until(lambda: int(pg.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'events'")) and
               int(pg.psql("SELECT count(*) FROM events")) >= 10_000, 30, "the first batches stored")
    assert victim.proc is not None
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.wait()
    assert in_flight_keys(redis)
    a = consumers(pg.dsn, name="a", batch=2000).start("--once")
    b = consumers(pg.dsn, name="b", batch=2000).start("--once")
    assert a.wait() == 0 and b.wait() == 0
    ids = pg_ids(pg)
    assert len(ids) == len(recs) and set(ids) == ids_of(recs)
    assert_nothing_in_flight(redis)
    row = pg.psql("SELECT type, ts, received_at, event::text FROM events WHERE id = "
                  f"'{orjson.loads(recs[1])['id']}'")
    event = orjson.loads(recs[1])
    assert row.split("|", 3) == [event["type"], str(event["ts"]), str(event["received_at"]), recs[1].decode()]


def test_postgresql_down_then_back_loses_nothing_and_redelivery_is_skipped(
        consumers: Callable[..., Consumer], redis: redislib.Redis, pg: PostgresServer) -> None:
    recs = make_records(20_000)
    fill(redis, recs[:5000])
    c = consumers(pg.dsn, batch=1000).start()
    wait_until(lambda: c.logs("postgresql sink open") and not redis.llen(QUEUE) and not in_flight_keys(redis),
               30, "the first events stored")
    pg.pause()
    try:
        fill(redis, recs[5000:])
        wait_until(lambda: c.logs("cannot store a batch; retrying with backoff"), 30, "the consumer to see the outage")
        assert c.alive()
    finally:
        pg.resume()
    wait_until(lambda: int(pg.psql("SELECT count(*) FROM events")) == len(recs), 60, "every event stored")
    fill(redis, recs[:3000])  # a batch delivered twice: the staging path skips what is there
    wait_until(lambda: not redis.llen(QUEUE) and not in_flight_keys(redis), 30, "the repeats drained")
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait() == 0
    assert set(pg_ids(pg)) == ids_of(recs) and len(pg_ids(pg)) == len(recs)
    assert c.logs("consumer stopped")[0]["duplicates"] == 3000


def test_postgresql_refused_rows_become_dead_letters(
        consumers: Callable[..., Consumer], redis: redislib.Redis, pg: PostgresServer) -> None:
    recs = make_records(100)
    nul = b'{"id":"nul\\u0000id","type":"a","received_at":1}'  # valid JSON, but text has no NUL
    fill(redis, recs[:40] + [nul] + recs[40:])
    assert consumers(pg.dsn).run_once() == 0
    assert len(pg_ids(pg)) == 100
    entries = [json.loads(e) for e in redis.lrange(DEAD, 0, -1)]
    assert [e["record"] for e in entries] == [nul.decode()]
    assert "postgresql refused it" in entries[0]["reason"]


def test_postgresql_stores_or_dead_letters_out_of_range_numbers_and_long_ids(
        consumers: Callable[..., Consumer], redis: redislib.Redis, pg: PostgresServer) -> None:
    """received_at beyond 64 bits crashed the consumer on every start (asyncpg's int8 encoder
    raised OverflowError), the queue blocked for good."""
    recs = make_records(50)
    odd = [crafted("huge-ts", ts=2**63), crafted("late", received_at=2**63), crafted("i" * 129)]
    fill(redis, recs[:25] + odd + recs[25:])
    assert consumers(pg.dsn).run_once() == 0
    assert len(pg_ids(pg)) == 51
    assert pg.psql("SELECT ts IS NULL, event::jsonb->>'ts' FROM events WHERE id = 'huge-ts'") == f"t|{2**63}"
    assert set(dead_reasons(redis)) == {"late", "i" * 129}


def test_postgresql_sink_stores_a_batch_row_by_row_when_some_row_is_refused(pg: PostgresServer) -> None:
    """An int8 overflow (asyncpg's OverflowError) and an index entry over 2704 bytes
    (ProgramLimitExceededError, class 54) are the rows' fault: dead letters, not retries."""
    rows, late, wide = refusable_rows()
    sink = PostgresSink(pg.dsn, "events", 1, stall=10.0)

    async def write() -> Written:
        await sink.open()
        try:
            return await sink.write(rows)
        finally:
            await sink.close()

    written = asyncio.run(write())
    assert written.inserted == 10
    reasons = dict(written.rejected)
    assert list(reasons) == [late, wide]
    assert "postgresql refused it: OverflowError" in reasons[late]
    assert "postgresql refused it: ProgramLimitExceededError" in reasons[wide]
    assert len(pg_ids(pg)) == 10


def test_postgresql_table_locked_elsewhere_a_stall_is_retried_and_a_second_term_ends_it(
        consumers: Callable[..., Consumer], redis: redislib.Redis, pg: PostgresServer) -> None:
    """A lock held by another application made the COPY wait for ever: TERM, a second TERM
    and the 30 s limit were ignored, and the renewed lease kept the batches from anyone."""
    recs = make_records(3000)
    fill(redis, recs[:1000])
    c = consumers(pg.dsn, batch=500).start()  # lease 1 s: a statement may take 0.67 s
    wait_until(lambda: c.logs("postgresql sink open") and not redis.llen(QUEUE) and not in_flight_keys(redis),
               30, "the first events stored")
    with pg.hold("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"):
        fill(redis, recs[1000:])
        wait_until(lambda: c.logs("cannot store a batch; retrying with backoff"), 30, "the stalled COPY cancelled")
        assert "statement timeout" in c.logs("cannot store a batch; retrying with backoff")[0]["error"]
        assert c.alive() and c.proc is not None
        c.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: c.logs("stopping: finishing the batches in hand"), 20, "the stop to begin")
        c.proc.send_signal(signal.SIGTERM)
        assert c.wait(10) == 1  # at once, not after 30 s
        assert redis.llen(QUEUE) == 2000 and in_flight_keys(redis) == []  # what it held went back
    assert consumers(pg.dsn, name="after").run_once() == 0
    assert set(pg_ids(pg)) == ids_of(recs)


def test_postgresql_term_while_the_sink_opens_behind_a_lock_exits_0_at_once(
        consumers: Callable[..., Consumer], pg: PostgresServer) -> None:
    with pg.hold("SELECT pg_advisory_xact_lock(hashtext('meteorit:events'))"):  # as another consumer creating the table
        c = consumers(pg.dsn, lease=60.0).start()  # a statement may take 40 s: only the stop ends the wait
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'") == "1",
                   30, "the consumer waiting for the lock")
        assert c.proc is not None
        c.proc.send_signal(signal.SIGTERM)
        assert c.wait(10) == 0
    assert "stored 0 events" in c.stdout()
