"""How clients reach Redis in each mode (meteorit/topology.py), against real servers: the
cluster and sentinel fixtures themselves (tests/redis_cluster.py), the shard key layout,
and redis-py's clients built from a config finding the cluster's slots and the sentinels'
primary, before and after a failover."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator

import pytest
from redis.crc import key_slot

from meteorit import config, topology
from redis_cluster import Cluster, SentinelSet, SERVICE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def cluster_config(c: Cluster, **redis: object) -> config.Config:
    return config.load(env={}, overrides={"redis.mode": "cluster", "redis.nodes": c.seeds,
                                          **{f"redis.{k}": v for k, v in redis.items()}})


def test_shard_keys_carry_the_shard_number_as_their_hash_tag() -> None:
    cfg = config.load(env={}, overrides={"redis.mode": "cluster", "redis.nodes": ["h:1"], "redis.shards": 4})
    assert topology.queue_keys(cfg) == [f"meteorit:events:{{{i}}}" for i in range(4)]
    assert key_slot(b"meteorit:events:{3}") == key_slot(b"3") == key_slot(b"meteorit:dead:{3}")
    assert topology.queue_keys(config.load(env={})) == ["meteorit:events"]


def test_the_cluster_fixture_has_three_primaries_each_with_a_replica(cluster: Cluster) -> None:
    shape = cluster.topology()
    assert len(shape) == 3 and all(len(replicas) == 1 for replicas in shape.values())
    # the default 16 shards land on every primary: the load can spread
    owners = {cluster.primary_of(key) for key in topology.queue_keys(cluster_config(cluster))}
    assert owners == set(shape)


def test_a_cluster_client_from_the_config_writes_to_the_slot_owner(cluster: Cluster) -> None:
    cfg = cluster_config(cluster)

    async def push() -> list[int]:
        client = topology.client(cfg, cfg.redis_connect_url)
        try:
            return [await client.rpush(key, b"x") for key in topology.queue_keys(cfg)]
        finally:
            await topology.aclose(client)

    assert asyncio.run(push()) == [1] * 16
    for key in topology.queue_keys(cfg):
        with cluster.node(cluster.primary_of(key)).client() as owner:
            assert owner.llen(key) == 1
    with cluster.client() as c:
        c.delete(*topology.queue_keys(cfg))


def test_a_sentinel_client_follows_the_primary_across_a_failover(tmp_path: Path) -> None:
    with SentinelSet(tmp_path) as sentinels:
        assert sentinels.primary is not None and sentinels.replica is not None
        cfg = config.load(env={}, overrides={"redis.mode": "sentinel", "redis.nodes": sentinels.addresses,
                                             "redis.sentinel_master": SERVICE, "redis.timeout": 2.0})

        async def port_of_primary() -> int:
            client = topology.client(cfg, cfg.redis_connect_url)
            try:
                await client.rpush("q", b"x")
                conn = await client.connection_pool.get_connection()
                try:
                    return int(conn.port)
                finally:
                    await client.connection_pool.release(conn)
            finally:
                await topology.aclose(client)

        assert asyncio.run(port_of_primary()) == sentinels.primary.port
        old = sentinels.primary.port
        sentinels.primary.kill()
        new = sentinels.wait_failover(old)
        assert new == sentinels.replica.port
        assert asyncio.run(port_of_primary()) == new
