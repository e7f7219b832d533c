"""Sentinel mode under a failover: the real master and workers writing to the primary that
3 real sentinels name (tests/redis_cluster.py), a real consumer draining it into SQLite,
and the primary killed with SIGKILL under a ledgered load (tests/ledger.py).

With `redis.wait_replicas = 1` every 202 from Redis means the replica had the events: the
failover loses none of them. Events the workers could not write while the sentinels
elected the replica went to the spools (answered 202 spooled) and are replayed into the
new primary; the consumer follows the primary across the failover (a batch it popped on
the old primary that the new one never saw is popped again, and the sink's insert by id
keeps one copy). In the end every acknowledged id is in the sink.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Callable

import pytest

from conftest import Meteorit, wait_until
from consumer_process import Consumer
from ledger import Ledger, Load, report
from redis_cluster import SERVICE, SentinelSet, _info

pytestmark = [pytest.mark.slow, pytest.mark.faults]

EVENTS = int(os.environ.get("METEORIT_CHAOS_EVENTS", "2000"))  # acknowledged before and after the kill
LOAD_TIMEOUT = 60 + EVENTS / 500
SETTLE_TIMEOUT = 60 + EVENTS / 2000


def stored_ids(db: Path) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as conn:
        try:
            return [row[0] for row in conn.execute("SELECT id FROM events")]
        except sqlite3.OperationalError:  # the consumer has not made the table yet
            return []


def test_the_primary_killed_under_load_loses_nothing_acknowledged(
        tmp_path: Path, meteorit_factory: Callable[..., Meteorit]) -> None:
    with SentinelSet(tmp_path / "sentinels") as sentinels:
        assert sentinels.primary is not None
        redis = {"mode": "sentinel", "nodes": sentinels.addresses, "sentinel_master": SERVICE,
                 "timeout": 2.0, "wait_replicas": 1}
        m = meteorit_factory({"redis": redis, "spool": {"redis_deadline": 0.5},
                              "server": {"graceful_timeout": 10.0}})
        consumer = Consumer(tmp_path, "c1", redis, "sqlite:///events.db", lease=3.0).start()
        ledger = Ledger("sentinel-")
        try:
            with Load(m.port, ledger, connections=4, batch=10) as load:
                load.wait_acknowledged(EVENTS, LOAD_TIMEOUT)
                old = sentinels.primary.port
                sentinels.primary.kill()
                new = sentinels.wait_failover(old)
                # The killed node comes back empty; the sentinels make it the new primary's
                # replica, and WAIT 1 is met again.
                sentinels.primary.start()
                wait_until(lambda: _info(new, "replication").get("connected_slaves", 0) >= 1, 60,
                           "the old primary to come back as a replica")
                load.wait_acknowledged(ledger.acknowledged + EVENTS, LOAD_TIMEOUT)
            db = tmp_path / "events.db"
            audit = ledger.audit_ids(stored_ids(db))
            deadline_hit = False
            try:
                wait_until(lambda: ledger.audit_ids(stored_ids(db)).missing == 0, SETTLE_TIMEOUT,
                           "every acknowledged event in the sink")
            except AssertionError:
                deadline_hit = True
            audit = ledger.audit_ids(stored_ids(db))
            report("sentinel: the primary killed under load, wait_replicas = 1", audit,
                   note="the sentinels promoted its replica; the killed node came back as a replica; "
                        "ids read from the consumer's SQLite table")
            assert not deadline_hit and audit.missing == 0, f"acknowledged, not stored: {audit.missing_ids}"
            assert audit.spooled > 0  # the failover's gap went through the spools
            assert m.logs("redis reachable again")  # the workers found the new primary
            assert consumer.alive()
        finally:
            consumer.stop()
