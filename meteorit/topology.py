"""How a client reaches Redis in each `redis.mode`, and where the queue's keys live.

Owns: building redis-py's asyncio clients from a Config: single mode from `redis.url`,
cluster mode a `RedisCluster` from the seed nodes `redis.nodes` (redis-py learns the slots,
follows MOVED/ASK and refreshes the map after a failover), sentinel mode the primary the
sentinels in `redis.nodes` name `redis.sentinel_master` (looked up again on every new
connection, so a failover is followed by reconnecting); the credentials and TLS of the
data nodes; and the key layout of cluster mode, a contract for every consumer:

    Q:{i}          shard i of the queue Q = `redis.queue`, i in 0 .. redis.shards - 1: a list
                   the workers RPUSH onto, exactly as the single queue. The hash tag {i} puts
                   each shard in the slot of the string "i", so shards spread over the slots
                   and everything of shard i shares one slot: the consumer's keys of shard i
                   are Q:{i}:... (see consumer/batches.py), its dead letters D:{i}.

Must not touch: what is written or read (the worker's writer, the consumer's batches).
Nothing here opens a connection: clients connect on first use, inside the caller's loop.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from .config import CLUSTER, SENTINEL, Config, parse_redis_node

# A cluster client gives up a command after this many topology refreshes; the writer moves
# a failing shard's events elsewhere itself, so it wants an answer soon rather than late.
CLUSTER_ATTEMPTS = 2


def shard_key(name: str, shard: int) -> str:
    """The key of shard `shard` of the list `name` (the queue, or the dead letters)."""
    return f"{name}:{{{shard}}}"


def queue_keys(cfg: Config) -> list[str]:
    """Every list the workers push events to: the shards in cluster mode, else the queue."""
    if cfg.redis.mode == CLUSTER:
        return [shard_key(cfg.redis.queue, i) for i in range(cfg.redis.shards)]
    return [cfg.redis.queue]


def node_kwargs(cfg: Config) -> dict[str, Any]:
    """Connection settings of every data node in cluster and sentinel modes."""
    kwargs: dict[str, Any] = {"socket_timeout": cfg.redis.timeout,
                              "socket_connect_timeout": cfg.redis.timeout}
    if cfg.redis.username:
        kwargs["username"] = cfg.redis.username
    if cfg.redis.password:
        kwargs["password"] = cfg.redis.password
    if cfg.redis.tls:
        kwargs["ssl"] = True
    return kwargs


def cluster_client(cfg: Config, **extra: Any) -> RedisCluster:
    nodes = [ClusterNode(*parse_redis_node(node)) for node in cfg.redis.nodes]
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), CLUSTER_ATTEMPTS)
    return RedisCluster(startup_nodes=nodes, **{"retry": retry, **node_kwargs(cfg), **extra})


def sentinel_manager(cfg: Config) -> Sentinel:
    sentinels = [parse_redis_node(node) for node in cfg.redis.nodes]
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": cfg.redis.timeout,
                                       "socket_connect_timeout": cfg.redis.timeout}
    if cfg.redis.tls:
        sentinel_kwargs["ssl"] = True
    return Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **node_kwargs(cfg))


def sentinel_pool(cfg: Config, **extra: Any) -> SentinelConnectionPool:
    """A pool whose connections go to the primary the sentinels name at connect time."""
    manager = sentinel_manager(cfg)
    return SentinelConnectionPool(cfg.redis.sentinel_master, manager,
                                  **{**manager.connection_kwargs, **extra})


def client(cfg: Config, url: str, **extra: Any) -> Redis | RedisCluster:
    """A client of the queue's Redis: `url` in single mode (redis.url, or the embedded
    Redis's socket), the cluster, or the sentinels' primary."""
    if cfg.redis.mode == CLUSTER:
        return cluster_client(cfg, **extra)
    if cfg.redis.mode == SENTINEL:
        return Redis(connection_pool=sentinel_pool(cfg, **extra))
    return Redis.from_url(url, socket_timeout=cfg.redis.timeout, socket_connect_timeout=cfg.redis.timeout,
                          **extra)


async def aclose(client: Redis | RedisCluster) -> None:
    """Close a client of `client()`, and in sentinel mode its connections to the sentinels
    (the primary's client does not own them)."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        await close_pool(pool)


async def close_pool(pool: SentinelConnectionPool) -> None:
    await pool.disconnect()
    await pool.sentinel_manager.aclose()
