"""The worker's Redis writer: group commit of events into the queue, the spool when Redis
cannot take them, and the replay of spools.

Modules, by concern: `commit` (the group commit over one connection: single mode,
and sentinel mode through the sentinels' primary), `shards` (cluster mode: the queue split
in shards, each group commit to a shard whose primary is up), `replay` (spools back into
Redis), `replicas` (redis.wait_replicas: WAIT's answers) and `wire` (packing, replies).
`open_writer` builds the one `redis.mode` asks for. Nothing else in a worker talks
to Redis (tests/test_layout.py holds that).
"""

from __future__ import annotations

from typing import Any

from ...config import CLUSTER, SENTINEL, Config
from ... import topology
from ..spool import Spool
from .commit import RedisWriter
from .replicas import ReplicasShort
from .wire import pack_rpush
from .shards import ClusterWriter

__all__ = ["ClusterWriter", "RedisWriter", "ReplicasShort", "open_writer", "pack_rpush"]


def open_writer(cfg: Config, redis_url: str, spool: Spool | None) -> RedisWriter:
    """The writer of `cfg.redis.mode`; `redis_url` is single mode's (the master resolves
    "embedded" to its Redis's socket). Call inside the worker's event loop."""
    r = cfg.redis
    common: dict[str, Any] = {
        "timeout": r.timeout, "batch_max_events": r.batch_max_events, "batch_max_bytes": r.batch_max_bytes,
        "max_pending_bytes": r.max_pending_bytes, "spool": spool, "deadline": cfg.spool.redis_deadline,
        "max_queue_length": r.max_queue_length, "wait_replicas": r.wait_replicas}
    if r.mode == CLUSTER:
        return ClusterWriter(topology.cluster_client(cfg), r.queue, r.shards, **common)
    if r.mode == SENTINEL:
        return RedisWriter("", r.queue, pool=topology.sentinel_pool(cfg), mode=SENTINEL, **common)
    return RedisWriter(redis_url, r.queue, **common)
