"""Cluster mode's writer: the queue split in `redis.shards` lists over a Redis Cluster.

Owns: which shard each group commit goes to, the exchange with that shard's primary (on
one of redis-py's connections to that node: RPUSH, and WAIT on the same connection, which
is what WAIT counts), following MOVED and ASK, marking the shards of a primary that does
not answer unreachable and probing them back, and the queue's length as the sum over the
shards. redis-py's RedisCluster owns the topology: the slot map, the nodes and their
connections, refreshed from the seed nodes after a failover.
Must not touch: the group commit, the spool and the replay (commit.py, replay.py): this
class only replaces how one batch reaches Redis and how Redis is probed.

Where a batch goes: each group commit takes the next shard of a rotation (a request's
events stay in one RPUSH, so in one shard, in order; order across shards is not kept, and
never was across requests). A shard whose primary does not answer (refused, reset, timed
out, CLUSTERDOWN, a failover under way) is skipped, with every other shard of that node,
and the batch goes at once to the next shard that is up; only when no shard can take it
does it go to the spool (through RedisWriter, as in single mode). A shard whose WAIT fell
short is skipped for SHARD_COOLDOWN. While a shard is unreachable the writer refreshes the
slot map and probes the shard's primary every REFRESH_INTERVAL: after a failover the
promoted replica takes the shard back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import hiredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (AskError, ClusterDownError, MovedError, RedisClusterException, ResponseError,
                              TryAgainError)

from ...topology import shard_key
from .commit import HEARTBEAT, WAIT_MARGIN, RedisWriter
from .replicas import ReplicasShort
from .wire import TRANSPORT_ERRORS, exchange, pack_rpush

log = logging.getLogger("meteorit.writer")

REFRESH_INTERVAL = 0.5  # seconds between slot-map refreshes and probes while a shard is unreachable
SHARD_COOLDOWN = 5.0  # seconds a shard whose WAIT fell short is left out of the rotation
MAX_REDIRECTS = 3  # MOVED / ASK followed for one batch before its shard counts as unreachable
ASKING = hiredis.pack_command((b"ASKING",))
# A primary that cannot take a write now: its shard is skipped, the batch goes elsewhere.
UNREACHABLE = (*TRANSPORT_ERRORS, ClusterDownError, TryAgainError, RedisClusterException)


class ShardUnreachable(ConnectionError):
    """A shard's primary did not take a batch: redirected too often, or not known."""


class ClusterWriter(RedisWriter):
    def __init__(self, cluster: RedisCluster, queue: str, shards: int, **kwargs: Any) -> None:
        super().__init__("", queue, mode="cluster", **kwargs)
        self.cluster = cluster
        self.shards = shards
        self.keys = [shard_key(queue, i).encode() for i in range(shards)]
        self.next_shard = os.getpid() % shards  # workers start their rotations apart
        self.unreachable: set[int] = set()
        self.cooldown: dict[int, float] = {}
        self.lengths = [0] * shards
        self.shard_writes = [0] * shards
        self.shard_errors = [0] * shards
        self.initialized = False

    async def start(self) -> None:
        await super().start()
        self._spawn(self._watch_shards())

    def apply(self, queue: str, wait_replicas: int) -> None:
        super().apply(queue, wait_replicas)
        self.keys = [shard_key(queue, i).encode() for i in range(self.shards)]

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await self.cluster.aclose()
        if self.spool is not None:
            await self.spool.close()

    # --- one batch to one shard

    async def _push(self, values: list[bytes]) -> Exception | None:
        """`values` into the next shard that takes them; the last error when none does."""
        error: Exception | None = None
        for shard in self._rotation():
            if shard in self.unreachable:  # found unreachable while this batch went round
                continue
            try:
                error = await self._push_to(shard, values)
            except UNREACHABLE as exc:
                self.write_errors += 1
                self.shard_errors[shard] += 1
                self._lost_shard(shard, exc)
                error = exc
                continue
            if error is None:
                self.shard_writes[shard] += 1
                return None
            self.write_errors += 1
            self.shard_errors[shard] += 1
            if isinstance(error, ReplicasShort):  # in Redis already: the spool takes a copy
                self.cooldown[shard] = time.monotonic() + SHARD_COOLDOWN
                log.warning("shard %d: %s within %.1fs; its events go to the spool too, and the shard "
                            "sits out for %.0fs", shard, error, self.timeout, SHARD_COOLDOWN)
                return error
            log.error("redis refused a write of %d events to shard %d: %s", len(values), shard, error)
        if len(self.unreachable) == self.shards:
            self._went_down(error or ShardUnreachable("no shard is reachable"))
        return error or ShardUnreachable("no shard is reachable")

    def _saw_replicas(self, replicas: object, wanted: int) -> ReplicasShort | None:
        """Per shard here: a short WAIT cools its shard down (see _rotation) and the other
        shards, and replays, go on; no writer-wide `replicas_short`."""
        if isinstance(replicas, int) and replicas >= wanted:
            return None
        self.waits_short += 1
        return ReplicasShort(f"WAIT {wanted}: {replicas} replicas acknowledged")

    def _rotation(self) -> list[int]:
        """The shards to try for the next batch, the next in turn first; those cooling down
        after a short WAIT only when nothing else is left."""
        start = self.next_shard
        self.next_shard = (start + 1) % self.shards
        order = [(start + i) % self.shards for i in range(self.shards)]
        now = time.monotonic()
        usable = [s for s in order if s not in self.unreachable and self.cooldown.get(s, 0.0) <= now]
        return usable or [s for s in order if s not in self.unreachable]

    async def _push_to(self, shard: int, values: list[bytes]) -> Exception | None:
        """RPUSH (and WAIT) on the shard's primary, following MOVED and ASK. None once
        acknowledged; a command error or ReplicasShort as the result; raises when the
        primary cannot be reached."""
        key = self.keys[shard]
        wanted = self.wait_replicas
        body = pack_rpush(key, values) + (self.pack_wait(wanted) if wanted else b"")
        node = self._primary(key)
        asking = False
        for _ in range(MAX_REDIRECTS + 1):
            answers = await self._exchange_on(node, ASKING + body if asking else body,
                                              (2 if wanted else 1) + asking)
            first = answers[1] if asking else answers[0]
            if isinstance(first, MovedError):  # the slot moved for good: a reshard, a failover
                await self.cluster.nodes_manager.move_slot(first)
                node, asking = self._primary(key), False
                continue
            if isinstance(first, AskError):  # the slot is migrating and our key is there already
                node, asking = self._node_at(first.host, first.port), True
                continue
            if isinstance(first, UNREACHABLE):
                raise first
            if isinstance(first, ResponseError):
                return first
            self._saw_shard_length(shard, first)
            return self._saw_replicas(answers[-1], wanted) if wanted else None
        raise ShardUnreachable(f"shard {shard}: more than {MAX_REDIRECTS} redirects")

    async def _exchange_on(self, node: ClusterNode, packed: bytes, replies: int) -> list[Any]:
        """Pipelined commands and their replies on one connection of `node`."""
        conn = node.acquire_connection()
        try:
            return await exchange(conn, packed, replies, self.timeout + WAIT_MARGIN, node.name)
        finally:
            node.release(conn)

    def _primary(self, key: bytes) -> ClusterNode:
        return self.cluster.nodes_manager.get_node_from_slot(key_slot(key))

    def _node_at(self, host: str, port: int) -> ClusterNode:
        node = self.cluster.get_node(host=host, port=port)
        if node is None:
            raise ShardUnreachable(f"redirected to {host}:{port}, a node the slot map does not know yet")
        return node

    def _saw_shard_length(self, shard: int, length: object) -> None:
        if isinstance(length, int):
            self.lengths[shard] = length
            self._saw_queue_length(sum(self.lengths))  # redis.max_queue_length: over every shard

    # --- unreachable shards

    def _shards_of(self, node_name: str) -> list[int]:
        found = []
        for shard, key in enumerate(self.keys):
            try:
                if self._primary(key).name == node_name:
                    found.append(shard)
            except RedisClusterException:
                found.append(shard)  # no owner known: as unreachable as it gets
        return found

    def _lost_shard(self, shard: int, exc: BaseException) -> None:
        """The shard's primary did not answer: every shard of that node is left out until a
        probe finds its primary (the same, or the replica promoted in its place) again."""
        try:
            node = self._primary(self.keys[shard]).name
            lost = set(self._shards_of(node))
        except RedisClusterException:
            node, lost = "?", {shard}
        fresh = sorted(lost - self.unreachable)
        self.unreachable |= lost
        if fresh:
            log.warning("redis node %s unreachable: shards %s go to the other shards until it is back: %s",
                        node, fresh, exc)

    async def _watch_shards(self) -> None:
        """Probe unreachable shards; and with redis.max_queue_length, sum every shard's length
        once a second even while writes flow: an RPUSH's reply tells one shard's length only,
        and the other workers write to the other shards."""
        last_sweep = time.monotonic()
        while not self.closed:
            await asyncio.sleep(REFRESH_INTERVAL)
            sweep = self.max_queue_length and time.monotonic() - last_sweep >= HEARTBEAT
            if self.ready and (self.unreachable or sweep):  # not ready: the writer's own probe runs
                last_sweep = time.monotonic()
                try:
                    await self._check_queue()
                except UNREACHABLE as exc:
                    self._went_down(exc)

    async def _check_queue(self) -> None:
        """Refresh the slot map when a shard is unreachable, then LLEN every shard on its
        primary (one pipeline per node): the queue's length, and which shards are back.
        Raises a transport error when no primary answers."""
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        try:
            if not self.initialized or self.unreachable:
                await self._refresh()
            for shard, key in enumerate(self.keys):
                node = self._primary(key)
                by_node.setdefault(node.name, (node, []))[1].append(shard)
        except RedisClusterException as exc:  # no seed node answers, or no slot map yet
            raise ShardUnreachable(f"no slot map of the cluster: {exc}") from exc
        results = await asyncio.gather(*(self._lengths_on(node, shards) for node, shards in by_node.values()),
                                       return_exceptions=True)
        back: list[int] = []
        answered = False
        for (node, shards), result in zip(by_node.values(), results):
            if isinstance(result, BaseException):
                if not isinstance(result, UNREACHABLE):
                    raise result
                self._lost_shard(shards[0], result)
                continue
            answered = True
            for shard, length in zip(shards, result):
                if isinstance(length, int):
                    self.lengths[shard] = length
                    if shard in self.unreachable:
                        self.unreachable.discard(shard)
                        back.append(shard)
        if back:
            log.info("shards %s reachable again", sorted(back))
        if not answered:
            raise ShardUnreachable("no primary of the cluster answers")
        self._last_ok = time.monotonic()
        self._saw_queue_length(sum(self.lengths))

    async def _lengths_on(self, node: ClusterNode, shards: list[int]) -> list[Any]:
        packed = b"".join(hiredis.pack_command((b"LLEN", self.keys[s])) for s in shards)
        return await self._exchange_on(node, packed, len(shards))

    async def _refresh(self) -> None:
        """The slot map again, from the seed nodes (and the nodes learnt since)."""
        if not self.initialized:
            await self.cluster.initialize()
            self.initialized = True
        else:
            await self.cluster.nodes_manager.initialize()

    # --- what it looks like, for /readyz, /metrics and meteoritctl status

    def topology(self) -> dict[str, Any]:
        nodes: dict[str, dict[str, Any]] = {}
        for shard, key in enumerate(self.keys):
            try:
                name = self._primary(key).name
            except RedisClusterException:
                name = "unknown"
            entry = nodes.setdefault(name, {"shards": [], "reachable": True})
            entry["shards"].append(shard)
            if shard in self.unreachable:
                entry["reachable"] = False
        return {"mode": "cluster", "nodes": nodes, "shards": self.shards, "unreachable": sorted(self.unreachable)}

    def shard_counters(self) -> dict[str, dict[str, int]]:
        return {str(s): {"writes": self.shard_writes[s], "errors": self.shard_errors[s]}
                for s in range(self.shards)}

    def readiness_note(self) -> str:
        nodes = {node for node, entry in self.topology()["nodes"].items()}
        note = f"; cluster: {self.shards} shards on {len(nodes)} primaries"
        if self.unreachable:
            note += "; unreachable shards: " + " ".join(map(str, sorted(self.unreachable)))
        return note
