"""Cluster mode under faults, with the ledger (tests/ledger.py): the real master and
workers writing to a real Redis Cluster of 3 primaries and 3 replicas (a cluster of the
test's own: each scenario changes the topology), under a ledgered load, while a primary
fails over on request (CLUSTER FAILOVER), is killed with SIGKILL, or gives slots away
(`redis-cli --cluster reshard`). In the end the test reads every shard: every acknowledged
id must be there, except what the README says a failover may lose without
`redis.wait_replicas`, which the ledger reports and the test bounds.

Sizes come from the environment, as in tests/test_faults.py, so bin/meteorit-chaos can
run these scenarios longer and print their ledgers.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import pytest
import redis as redislib
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.crc import key_slot

from conftest import Meteorit, wait_until
from ledger import Audit, Ledger, Load, report
from redis_cluster import READY_TIMEOUT, REDIS_CLI, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.faults]

QUEUE = "meteorit:events"
SHARDS = 16
EVENTS = int(os.environ.get("METEORIT_CHAOS_EVENTS", "3000"))
LOAD_TIMEOUT = 60 + EVENTS / 500
SETTLE_TIMEOUT = 60 + EVENTS / 2000
REPLICA_LAG = 1.5  # seconds the victim's replica sleeps (DEBUG SLEEP) before the victim is killed
STEADY = 3.0  # seconds the count of missing events must hold still to be a loss, not a replay under way
RESHARD_SLOTS = 2000  # slots 0..1999 of the first primary: the slots of shards 3, 7, 10 and 14


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster") as c:
        yield c


def start(factory: Callable[..., Meteorit], cluster: Cluster, **redis: Any) -> Meteorit:
    return factory({"redis": {"mode": "cluster", "nodes": cluster.seeds, "shards": SHARDS, "timeout": 2.0,
                              **redis},
                    "spool": {"redis_deadline": 0.5}, "server": {"graceful_timeout": 10.0}})


def shard_ids(cluster: Cluster) -> list[str]:
    with cluster.client() as c:
        return [orjson.loads(raw)["id"] for i in range(SHARDS) for raw in c.lrange(f"{QUEUE}:{{{i}}}", 0, -1)]


def settle(name: str, ledger: Ledger, cluster: Cluster, note: str = "", expect_missing: bool = False) -> Audit:
    """Wait until every acknowledged event is in the shards (spools replay in the background)
    or, when a loss is possible, until the count of missing events holds still for
    STEADY seconds; then report the ledger."""
    last: list[Any] = [None, 0.0]

    def done() -> bool:
        missing = ledger.audit_ids(shard_ids(cluster)).missing
        if missing != last[0]:
            last[:] = [missing, time.monotonic()]
        return missing == 0 or (expect_missing and time.monotonic() - last[1] >= STEADY)
    try:
        wait_until(done, SETTLE_TIMEOUT, "every acknowledged event in the shards")
    except AssertionError:
        pass  # the audit below says what is missing
    audit = ledger.audit_ids(shard_ids(cluster))
    report(name, audit, note, loss_allowed=expect_missing)
    return audit


def wait_failed_over(cluster: Cluster, killed: str) -> None:
    def promoted() -> bool:
        try:
            shape = cluster.topology()
        except redislib.RedisError:  # the node asked was the one killed, or busy electing
            return False
        return killed not in shape and len(shape) == 3
    wait_until(promoted, READY_TIMEOUT, f"a replica to take over from {killed}")
    cluster.wait_healthy(primaries=3, replicas=0)


def test_cluster_failover_on_request_under_load(meteorit_factory: Callable[..., Meteorit],
                                                cluster: Cluster) -> None:
    m = start(meteorit_factory, cluster)
    ledger = Ledger("manual-failover-")
    replicas = next(iter(cluster.topology().values()))
    with Load(m.port, ledger, connections=4) as load:
        load.wait_acknowledged(EVENTS, LOAD_TIMEOUT)
        with cluster.node(replicas[0]).client() as replica:
            replica.execute_command("CLUSTER", "FAILOVER")  # waits for the replica to catch up: no loss
        wait_until(lambda: replicas[0] in cluster.topology(), READY_TIMEOUT, "the replica to be promoted")
        load.wait_acknowledged(ledger.acknowledged + EVENTS, LOAD_TIMEOUT)
    audit = settle("cluster: CLUSTER FAILOVER under load", ledger, cluster, note=f"{replicas[0]} took over")
    assert audit.missing == 0, f"acknowledged but not in the shards: {audit.missing_ids}"
    assert ledger.statuses.keys() <= {202}, ledger.statuses


@pytest.mark.parametrize("wait_replicas", [1, 0])
def test_a_primary_killed_under_load(meteorit_factory: Callable[..., Meteorit], cluster: Cluster,
                                     wait_replicas: int) -> None:
    """The primary is killed while its replica lags (asleep for REPLICA_LAG s, its link cut,
    as a busy or distant replica would be): what the primary acknowledged meanwhile never
    reached the replica that takes over. With wait_replicas = 1 none of it was answered 202 from Redis (WAIT
    did not return in time: spooled, then replayed); with 0 the ledger counts what is lost."""
    m = start(meteorit_factory, cluster, wait_replicas=wait_replicas)
    ledger = Ledger(f"kill-primary-{wait_replicas}-")
    victim, (replica, *_) = next(iter(cluster.topology().items()))
    with Load(m.port, ledger, connections=4) as load:
        load.wait_acknowledged(EVENTS, LOAD_TIMEOUT)
        # Sent before now and answered already, or in flight (one request per connection):
        # whatever is older reached the replica before its link was cut.
        recent = len(ledger.fate) - load.connections * load.batch
        lagging = threading.Thread(target=sleep_node, args=(cluster, replica, REPLICA_LAG))
        lagging.start()
        wait_until(lambda: asleep(cluster, replica), 10, "the replica to be asleep")
        with cluster.node(victim).client() as primary:  # the replica asleep cannot come back meanwhile
            wait_until(lambda: primary.client_kill_filter(_type="replica"), 10, "the replica link cut")
        load.wait_acknowledged(ledger.acknowledged + EVENTS // 4, LOAD_TIMEOUT)
        cluster.node(victim).kill()
        lagging.join()
        wait_failed_over(cluster, victim)
        load.wait_acknowledged(ledger.acknowledged + EVENTS, LOAD_TIMEOUT)
    name = f"cluster: a primary killed under load, wait_replicas = {wait_replicas}"
    audit = settle(name, ledger, cluster, expect_missing=wait_replicas == 0,
                   note=f"{victim} killed with SIGKILL while its replica lagged {REPLICA_LAG:g} s; "
                        "the replica took over")
    assert not {s for s in ledger.statuses if s >= 500}, ledger.statuses  # the other shards took the load
    if wait_replicas:
        assert audit.missing == 0, f"acknowledged but not in the shards: {audit.missing_ids}"
        assert audit.spooled > 0  # the writes WAIT could not confirm went to the spools
        return
    # The README's risk, measured: writes the killed primary acknowledged while its replica
    # lagged are gone; never an older one.
    lost = [int(i.rsplit("-", 1)[1]) for i in audit.missing_ids]
    assert all(n >= recent for n in lost), (recent, audit.missing_ids)


def asleep(cluster: Cluster, address: str) -> bool:
    """The node does not answer a PING within 0.2 s (DEBUG SLEEP holds it)."""
    node = cluster.node(address)
    try:
        with redislib.Redis(port=node.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0)) as c:
            c.ping()
    except redislib.TimeoutError:
        return True
    return False


def sleep_node(cluster: Cluster, address: str, seconds: float) -> None:
    with cluster.node(address).client() as c:
        c.execute_command("DEBUG", "SLEEP", seconds)


def test_slots_resharded_under_load(meteorit_factory: Callable[..., Meteorit], cluster: Cluster) -> None:
    m = start(meteorit_factory, cluster)
    ledger = Ledger("reshard-")
    ids = {}
    with cluster.live()[0].client() as c:
        for line in c.execute_command("CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            if "master" in fields[2]:
                ids[fields[1].split("@")[0]] = (fields[0], fields[8:])
    source = next(a for a, (_, slots) in ids.items() if any(s.startswith("0-") for s in slots))
    target = next(a for a in ids if a != source)
    moved_shards = [i for i in range(SHARDS) if cluster.primary_of(f"{QUEUE}:{{{i}}}") == source
                    and key_slot(str(i).encode()) < RESHARD_SLOTS]
    with Load(m.port, ledger, connections=4) as load:
        load.wait_acknowledged(EVENTS, LOAD_TIMEOUT)
        subprocess.run([REDIS_CLI, "--cluster", "reshard", source, "--cluster-from", ids[source][0],
                        "--cluster-to", ids[target][0], "--cluster-slots", str(RESHARD_SLOTS),
                        "--cluster-yes"], check=True, capture_output=True, timeout=120)
        cluster.wait_healthy()
        load.wait_acknowledged(ledger.acknowledged + EVENTS, LOAD_TIMEOUT)
    audit = settle("cluster: slots resharded under load", ledger, cluster,
                   note=f"{RESHARD_SLOTS} slots ({len(moved_shards)} shards) moved from {source} to {target}")
    assert audit.missing == 0, f"acknowledged but not in the shards: {audit.missing_ids}"
    assert not {s for s in ledger.statuses if s >= 500}, ledger.statuses
    assert moved_shards and all(cluster.primary_of(f"{QUEUE}:{{{i}}}") == target for i in moved_shards)

