"""meteorit-consumer in cluster mode, against a real Redis Cluster of 3 primaries and 3
replicas (tests/redis_cluster.py): shard leases, the shards shared by two consumers, a
gone consumer's shards and in-flight batches taken over, `--shards` pinning, and the
scripts' KEYS[] contract (every key in KEYS[], all in one slot: the cluster itself
refuses anything else, so these tests would fail on a script that broke it)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import pytest
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.crc import key_slot

from conftest import Meteorit, wait_until
from consumer_process import QUEUE, Consumer
from meteorit.consumer.shards import ShardedQueue, parse_shard_list, shard_of
from redis_cluster import Cluster

pytestmark = pytest.mark.slow

SHARDS = 16
DEAD = "meteorit:dead"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def clean_cluster(cluster: Cluster) -> Cluster:
    with cluster.client() as c:
        c.flushall(target_nodes=c.PRIMARIES)
    return cluster


def redis_section(cluster: Cluster) -> dict[str, Any]:
    return {"mode": "cluster", "nodes": cluster.seeds, "shards": SHARDS}


@pytest.fixture
def consumers(tmp_path: Path, clean_cluster: Cluster) -> Iterator[Callable[..., Consumer]]:
    started: list[Consumer] = []

    def make(name: str, **consumer: Any) -> Consumer:
        c = Consumer(tmp_path, name, redis_section(clean_cluster), "sqlite:///events.db?timeout=30",
                     **{"lease": 1.5, **consumer})
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


def shard(i: int) -> str:
    return f"{QUEUE}:{{{i}}}"


def fill_shards(cluster: Cluster, per_shard: int, shards: range | list[int] = range(SHARDS)) -> set[str]:
    ids = set()
    with cluster.client() as c:
        for i in shards:
            recs = [orjson.dumps({"type": "t", "id": f"s{i}-{n}", "received_at": 1}) for n in range(per_shard)]
            c.rpush(shard(i), *recs)
            ids.update(f"s{i}-{n}" for n in range(per_shard))
    return ids


def stored(tmp_path: Path) -> list[str]:
    db = tmp_path / "events.db"
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return [row[0] for row in conn.execute("SELECT id FROM events")]
        except sqlite3.OperationalError:
            return []


def leftovers(cluster: Cluster) -> list[bytes]:
    """Keys of the queue left once everything is stored: only empty-handed registrations may stay."""
    with cluster.client() as c:
        keys = c.keys(f"{QUEUE}:*", target_nodes=c.PRIMARIES)
    return sorted(k for k in keys if b":batch:" in k or b":inflight:" in k or k.count(b"}") and k.endswith(b"}"))


def test_events_through_meteorit_arrive_once_through_two_consumers(
        meteorit_factory: Callable[..., Meteorit], clean_cluster: Cluster,
        consumers: Callable[..., Consumer], tmp_path: Path) -> None:
    first, second = consumers("c1", batch=50).start(), consumers("c2", batch=50).start()

    def shares() -> list[set[int]]:
        return [set(c.logs("shards held")[-1]["shards"]) if c.logs("shards held") else set()
                for c in (first, second)]
    # they split the shards between them: 8 each, none held by both
    wait_until(lambda: [len(s) for s in shares()] == [8, 8], 30, "the consumers to share the shards")
    assert not shares()[0] & shares()[1]
    m = meteorit_factory({"redis": redis_section(clean_cluster)})
    sent = set()
    for r in range(300):
        batch = [{"type": "t", "id": f"r{r}-{e}"} for e in range(10)]
        assert m.post(batch)[0] == 202
        sent.update(e["id"] for e in batch)
    metrics = m.request("GET", "/metrics")[2].decode().splitlines()
    writes: dict[str, float] = {}  # per shard, summed over the workers
    for line in metrics:
        if line.startswith("meteorit_redis_shard_writes_total{"):
            label = line.split('shard="')[1].split('"')[0]
            writes[label] = writes.get(label, 0) + float(line.rsplit(" ", 1)[1])
    assert len(writes) == SHARDS and all(writes.values())  # every shard used
    wait_until(lambda: len(stored(tmp_path)) >= len(sent), 60, "every event stored")
    assert sorted(stored(tmp_path)) == sorted(sent)  # exactly once
    m.stop()
    for c in (first, second):
        c.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert c.wait() == 0
    # both took part, and nothing was stored twice
    counts = [c.logs("consumer stopped")[0] for c in (first, second)]
    assert all(entry["stored"] > 0 for entry in counts), counts
    assert sum(entry["stored"] for entry in counts) == len(sent)
    assert leftovers(clean_cluster) == []
    with clean_cluster.client() as c:  # given back on the way out
        assert not c.keys(f"{QUEUE}:*:owner", target_nodes=c.PRIMARIES)
        assert all(c.llen(shard(i)) == 0 for i in range(SHARDS))


def test_a_gone_consumers_shard_and_its_batches_are_taken_over(
        clean_cluster: Cluster, consumers: Callable[..., Consumer], tmp_path: Path) -> None:
    ids = fill_shards(clean_cluster, 20)

    async def die_holding_batches() -> list[int]:
        client = AsyncCluster(host="127.0.0.1", port=clean_cluster.live()[0].port)
        try:
            gone = ShardedQueue(client, QUEUE, DEAD, "gone", lease=0.5, shards=SHARDS, pinned=[3, 7])
            await gone.recover()
            assert sorted(gone.owned) == [3, 7]
            batches = [await gone.pop(5) for _ in range(3)]
            return [shard_of(b.key) for b in batches if b is not None]
        finally:
            await client.aclose()

    popped = asyncio.run(die_holding_batches())  # then it stops, holding them
    assert len(popped) == 3 and set(popped) == {3, 7}
    c = consumers("c1").start()
    wait_until(lambda: len(stored(tmp_path)) >= len(ids), 60, "every event stored")
    assert sorted(stored(tmp_path)) == sorted(ids)
    recovered = c.logs("recovered the in-flight batches a gone consumer left in a shard")
    assert sorted((e["shard"], e["records"]) for e in recovered) == [(s, 5 * popped.count(s)) for s in (3, 7)]
    c.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert c.wait() == 0
    assert leftovers(clean_cluster) == []


def test_a_consumer_killed_mid_drain_leaves_its_shards_to_the_other(
        clean_cluster: Cluster, consumers: Callable[..., Consumer], tmp_path: Path) -> None:
    ids = fill_shards(clean_cluster, 400)
    first = consumers("c1", batch=20).start()
    wait_until(lambda: first.logs("shards held") and len(stored(tmp_path)) > 200, 60, "c1 storing")
    second = consumers("c2", batch=20).start()
    wait_until(lambda: second.logs("shards held"), 30, "c2 to claim its share")
    first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    first.wait()
    # once c1's leases run out, c2 holds every shard
    wait_until(lambda: set(second.logs("shards held")[-1]["shards"]) == set(range(SHARDS)), 30,
               "the survivor to take every shard")
    wait_until(lambda: len(set(stored(tmp_path))) >= len(ids), 90, "every event stored by the survivor")
    assert sorted(set(stored(tmp_path))) == sorted(ids)


def test_pinned_shards_are_the_only_ones_drained(
        clean_cluster: Cluster, consumers: Callable[..., Consumer], tmp_path: Path) -> None:
    ids = fill_shards(clean_cluster, 10)
    c = consumers("c1")
    assert c.run_once("--shards", "0-3,8") == 0
    assert sorted(stored(tmp_path)) == sorted(i for i in ids if int(i[1:i.index("-")]) in (0, 1, 2, 3, 8))
    with clean_cluster.client() as client:
        assert [client.llen(shard(i)) for i in range(SHARDS)] == [0 if i in (0, 1, 2, 3, 8) else 10
                                                                   for i in range(SHARDS)]
    assert consumers("c2").run_once("--shards", "9-20") == 2
    assert parse_shard_list("0-3,8,2", 16) == [0, 1, 2, 3, 8]
    for bad in ("3-1", "a", "16", "1-"):
        with pytest.raises(ValueError):
            parse_shard_list(bad, 16)


def test_once_drains_every_shard_and_every_key_is_in_its_shards_slot(
        clean_cluster: Cluster, consumers: Callable[..., Consumer], tmp_path: Path) -> None:
    ids = fill_shards(clean_cluster, 30)
    with clean_cluster.client() as c:
        c.rpush(shard(5), b"not json")  # a dead letter, filed in shard 5's dead-letter list
    first, second = consumers("c1", batch=7), consumers("c2", batch=7)
    first.start("--once")
    second.start("--once")
    assert first.wait() == 0 and second.wait() == 0
    assert sorted(stored(tmp_path)) == sorted(ids)
    with clean_cluster.client() as c:
        assert c.llen(f"{DEAD}:{{5}}") == 1
        keys = c.keys("meteorit:*", target_nodes=c.PRIMARIES)
    for key in keys:  # whatever stays (the dead letters, registrations) is in its shard's slot
        if b"{" in key:
            assert key_slot(key) == key_slot(str(shard_of(key)).encode())
