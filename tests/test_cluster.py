"""Cluster mode end to end: the real master and workers writing to a real Redis Cluster of
3 primaries and 3 replicas (tests/redis_cluster.py), the queue split in shards.

Ingest: every event acknowledged is in exactly one shard, once; the shards all take
events; /readyz, /metrics and `meteoritctl status` show the topology; the queue length cap
counts every shard. The failover, kill and reshard scenarios under load are in
tests/test_cluster_faults.py; the consumer's side in tests/test_consumer_cluster.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import pytest

from conftest import Meteorit, wait_until
from meteorit import config, topology
from meteorit.worker.spool import HEADER_SIZE, encode_frame, encode_header
from redis_cluster import Cluster

pytestmark = pytest.mark.slow

SHARDS = 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def clean_cluster(cluster: Cluster) -> Cluster:
    with cluster.client() as c:
        c.flushall(target_nodes=c.PRIMARIES)
    return cluster


def shard_keys(queue: str = "meteorit:events", shards: int = SHARDS) -> list[str]:
    cfg = config.load(env={}, overrides={"redis.mode": "cluster", "redis.nodes": ["x:1"], "redis.queue": queue,
                                         "redis.shards": shards})
    return topology.queue_keys(cfg)


def read_shards(cluster: Cluster, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    with cluster.client() as c:
        return {key: [orjson.loads(r) for r in c.lrange(key, 0, -1)] for key in keys}


def cluster_meteorit(factory: Callable[..., Meteorit], cluster: Cluster, **redis: Any) -> Meteorit:
    return factory({"redis": {"mode": "cluster", "nodes": cluster.seeds, "shards": SHARDS, **redis}})


def test_events_spread_over_every_shard_and_arrive_once(meteorit_factory: Callable[..., Meteorit],
                                                        clean_cluster: Cluster) -> None:
    m = cluster_meteorit(meteorit_factory, clean_cluster)
    requests = 160
    for r in range(requests):
        status, body = m.post([{"type": "t", "id": f"r{r}-e{e}"} for e in range(5)])
        assert (status, body) == (202, {"accepted": 5})
    shards = read_shards(clean_cluster, shard_keys())
    ids = [event["id"] for events in shards.values() for event in events]
    assert sorted(ids) == sorted(f"r{r}-e{e}" for r in range(requests) for e in range(5))
    assert all(shards.values()), {k: len(v) for k, v in shards.items()}  # every shard took events
    for events in shards.values():  # a request's events stay together, in order, in one shard
        by_request: dict[str, list[int]] = {}
        for event in events:
            r, e = event["id"].split("-")
            by_request.setdefault(r, []).append(int(e[1:]))
        assert all(seq == [0, 1, 2, 3, 4] for seq in by_request.values())
    primaries = {clean_cluster.primary_of(key) for key in shards}
    assert len(primaries) == 3  # and so every primary


def test_readyz_metrics_and_status_show_the_topology(meteorit_factory: Callable[..., Meteorit],
                                                     clean_cluster: Cluster) -> None:
    m = cluster_meteorit(meteorit_factory, clean_cluster)
    for r in range(40):
        assert m.post({"type": "t"})[0] == 202
    status, _, body = m.request("GET", "/readyz")
    assert status == 200 and body == b"ok; cluster: 16 shards on 3 primaries\n"
    status, _, body = m.request("GET", "/metrics")
    text = body.decode()
    writes: dict[str, float] = {}  # per shard, summed over the workers (Prometheus: sum by (shard))
    for line in text.splitlines():
        if line.startswith("meteorit_redis_shard_writes_total{shard="):
            label = line.split('shard="')[1].split('"')[0]
            writes[label] = writes.get(label, 0) + float(line.rsplit(" ", 1)[1])
    assert set(writes) == {str(s) for s in range(SHARDS)} and sum(writes.values()) >= 40
    reachable = [line for line in text.splitlines() if line.startswith("meteorit_redis_shard_reachable{")]
    assert {line.split('shard="')[1].split('"')[0] for line in reachable} == {str(s) for s in range(SHARDS)}
    assert all(line.endswith(" 1") for line in reachable)
    owners = {clean_cluster.primary_of(key) for key in shard_keys()}
    assert all(any(f'node="{node}"' in line for line in reachable) for node in owners)
    reply = m.ctl_json("status")
    redis = reply["redis"]
    assert redis["mode"] == "cluster" and redis["shards"] == SHARDS and redis["unreachable"] == []
    assert set(redis["nodes"]) == owners
    assert sorted(s for entry in redis["nodes"].values() for s in entry["shards"]) == list(range(SHARDS))
    human = m.ctl("status").stdout
    assert "redis: cluster, 16 shard(s) on 3 primary node(s)" in human
    assert all(node in human for node in owners)


def test_the_queue_length_cap_counts_every_shard(meteorit_factory: Callable[..., Meteorit],
                                                 clean_cluster: Cluster) -> None:
    """Each worker learns one shard's length from each RPUSH reply and sums every shard once a
    second: past the cap (by the batches in flight at most), 503 until the shards drain."""
    m = cluster_meteorit(meteorit_factory, clean_cluster, max_queue_length=40)
    assert [m.post([{"type": "t"}] * 5)[0] for _ in range(8)] == [202] * 8  # 40: not over it
    for _ in range(4):
        assert m.post([{"type": "t"}] * 5)[0] in (202, 503)
    # every worker (each /readyz goes to either) has summed the shards within a second or two
    wait_until(lambda: all(m.request("GET", "/readyz")[0] == 503 for _ in range(8)), 10,
               "every worker to say the queue is over the cap")
    status, _, body = m.request("GET", "/readyz")
    assert body.startswith(b"queue over redis.max_queue_length")
    assert m.post({"type": "t"})[0] == 503
    shards = read_shards(clean_cluster, shard_keys())
    assert max(len(v) for v in shards.values()) < 40 < sum(len(v) for v in shards.values())
    with clean_cluster.client() as c:  # the consumer catches up: the cap lets events in again
        c.delete(*shard_keys())
    wait_until(lambda: all(m.request("GET", "/readyz")[0] == 200 for _ in range(8)), 10,
               "every worker to take events again")
    assert m.post({"type": "t"})[0] == 202


def test_a_replay_from_the_spool_goes_to_the_shards(meteorit_factory: Callable[..., Meteorit],
                                                    clean_cluster: Cluster, tmp_path: Path) -> None:
    """A spool left by a single-mode run (Redis was away) is replayed into the cluster's
    shards by a cluster-mode meteorit on the same spool.dir."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    records = [orjson.dumps({"type": "t", "id": f"spooled-{i}", "received_at": 1}) for i in range(30)]
    (spool_dir / "1-dead.spool").write_bytes(encode_header(HEADER_SIZE) + encode_frame(records[:10]) + encode_frame(records[10:]))
    m = meteorit_factory({"redis": {"mode": "cluster", "nodes": clean_cluster.seeds},
                          "spool": {"dir": str(spool_dir)}})

    def replayed() -> bool:
        ids = [e["id"] for events in read_shards(clean_cluster, shard_keys()).values() for e in events]
        return sorted(ids) == sorted(f"spooled-{i}" for i in range(30))
    wait_until(replayed, 20, "the orphan spool replayed into the shards")
    assert not list(spool_dir.glob("1-dead.spool"))
    assert json.loads(m.request("GET", "/v1/stats")[2])["total"]["events_replayed"] == 30
