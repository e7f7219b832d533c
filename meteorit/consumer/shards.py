"""The consumer's side of a sharded queue (cluster mode): shard leases, and per shard the
batches of consumer.batches, with every key a script touches in KEYS[] and in the shard's
slot.

Owns: claiming shards (a lease per shard), sharing them with the other consumers, taking
over a gone consumer's shards and the batches it left in flight there, and routing pops,
acks and releases to the right shard. Must not touch: decoding or storing records, the
pipeline's retries (consumer.pipeline), the single queue's scripts (consumer.batches).

Keys, for the queue Q, shard i (S = Q:{i}, see meteorit/topology.py) and a consumer C:

    S                 shard i of the queue (the workers RPUSH onto it)
    S:owner           the shard lease: C's id, SET NX with a PX expiry of consumer.lease
    S:consumers       set of the consumers that may hold batches of shard i
    S:inflight:C      zset of C's batch keys of shard i, scored by sequence number
    S:batch:C:SEQ     list: one batch of shard i, in queue order, until acknowledged
    D:{i}             the dead letters of shard i (D = consumer.dead_letter)
    Q:members         zset of the live consumers, scored by when their lease ends (Redis
                      time, ms): how many share the shards

Every key of shard i carries the tag {i}: each script touches one slot, through KEYS[].

A consumer pops only from shards it owns (the pop script checks S:owner, so a consumer
that lost its lease while stalled cannot pop there any more). Once it owns a shard that was
someone else's, no one else can add batches to that shard, which makes recovering the
previous owners' batches race-free: read S:consumers and each S:inflight:C (plain
commands), then pass those keys to the recovery script, which checks the lease again and
puts the batches back at the head of S in order. An ack needs no lease: a batch stored by
a consumer that lost its shard is acknowledged (or, recovered meanwhile, found gone).

Sharing: every consumer holds at most ceil(shards / live consumers) of the shards it may
take (all of them, or the ones pinned with --shards); on each lease round (consumer.lease
/ 3) it renews its shards, claims free ones up to that share, and gives back shards over
its share that have no batch in hand, so a consumer that joins gets its part within a
round or two, and the shards of one that died are claimed once their leases expire.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from redis.asyncio.cluster import RedisCluster

from ..topology import shard_key
from .batches import _PUSH_BACK, ACK, Batch, Script

log = logging.getLogger("meteorit.batches")

CLAIM = """
-- KEYS: owner; ARGV: consumer id, lease ms. 1 when the shard is ours (claimed or renewed).
local owner = redis.call('GET', KEYS[1])
if owner == false then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  return 1
end
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

POP = """
-- KEYS: shard, batch, inflight zset, owner, consumers; ARGV: count, seq, lease ms, consumer id
-- -1: the shard is not ours (any more).
if redis.call('GET', KEYS[4]) ~= ARGV[4] then return -1 end
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('SADD', KEYS[5], ARGV[4])
local n = redis.call('SORT', KEYS[1], 'BY', 'nosort', 'LIMIT', 0, ARGV[1], 'STORE', KEYS[2])
if n > 0 then
  redis.call('LTRIM', KEYS[1], n, -1)
  redis.call('ZADD', KEYS[3], ARGV[2], KEYS[2])
end
return n
"""

TAKE_OVER = _PUSH_BACK + """
-- KEYS: shard, owner, consumers, inflight zset of the consumer C gone from this shard,
-- then C's batch keys read from that zset; ARGV: our id, C. -1: the shard is not ours.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local only = {}
for i = 5, #KEYS do only[KEYS[i]] = true end
local moved = push_back(KEYS[1], KEYS[4], only)
if redis.call('ZCARD', KEYS[4]) == 0 then
  redis.call('DEL', KEYS[4])
  redis.call('SREM', KEYS[3], ARGV[2])
end
return moved
"""

RELEASE = _PUSH_BACK + """
-- KEYS: shard, inflight zset, then batch keys of this consumer to put back
local only = {}
for i = 3, #KEYS do only[KEYS[i]] = true end
return push_back(KEYS[1], KEYS[2], only)
"""

LEAVE = """
-- KEYS: owner, consumers, inflight zset; ARGV: consumer id. Give the shard back; keep the
-- registration while batches are in flight (they are recovered by the next owner).
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('ZCARD', KEYS[3]) > 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

MEMBERS = """
-- KEYS: members zset; ARGV: consumer id, lease ms. The live consumers, this one included.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""


def shard_of(key: str | bytes) -> int:
    """The shard number in a key's hash tag: `Q:{3}:batch:...` -> 3."""
    text = key.decode() if isinstance(key, bytes) else key
    return int(text[text.index("{") + 1:text.index("}")])


def parse_shard_list(text: str, shards: int) -> list[int]:
    """`--shards 0-3,8` -> [0, 1, 2, 3, 8]; ValueError names what is wrong."""
    chosen: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad shard range {part.strip()!r}: use N, N-M or a list such as 0-3,8")
        first, last = int(low), int(high) if sep else int(low)
        if first > last or last >= shards:
            raise ValueError(f"shard range {part.strip()!r} is not within 0-{shards - 1} (redis.shards)")
        chosen.update(range(first, last + 1))
    return sorted(chosen)


class ShardedQueue:
    """One consumer's view of a sharded queue; the same methods as BatchQueue."""

    def __init__(self, client: RedisCluster, queue: str, dead_letter: str, consumer_id: str, lease: float,
                 shards: int, pinned: list[int] | None = None) -> None:
        self.client = client
        self.queue = queue
        self.id = consumer_id
        self.lease_ms = max(1, int(lease * 1000))
        self.shards = shards
        self.candidates = list(pinned) if pinned else list(range(shards))
        self.pinned = bool(pinned)
        self.keys = [shard_key(queue, i) for i in range(shards)]
        self.dead = [shard_key(dead_letter, i) for i in range(shards)]
        self.members_key = f"{queue}:members"
        self.owned: list[int] = []
        self.touched: set[int] = set()  # shards this consumer registered in (left on leave)
        self.in_hand = [0] * shards  # batches popped and not yet acknowledged, per shard
        self.lost: list[str] = []  # pops whose reply never came: maybe moved, surely ours
        self._seq = 0
        self._turn = 0
        self._start = os.getpid() % max(1, len(self.candidates))  # consumers look for free shards apart
        self._claim = Script("claim", CLAIM)
        self._pop = Script("pop-shard", POP)
        self._ack = Script("ack", ACK)
        self._take_over = Script("take-over", TAKE_OVER)
        self._release = Script("release-shard", RELEASE)
        self._leave = Script("leave-shard", LEAVE)
        self._members = Script("members", MEMBERS)

    async def load_scripts(self) -> None:
        for script in (self._claim, self._pop, self._ack, self._take_over, self._release, self._leave,
                       self._members):
            await script.load(self.client)

    # --- keys

    def batch_key(self, shard: int, seq: int) -> str:
        return f"{self.keys[shard]}:batch:{self.id}:{seq}"

    def inflight_key(self, shard: int, consumer: str | None = None) -> str:
        return f"{self.keys[shard]}:inflight:{consumer or self.id}"

    def owner_key(self, shard: int) -> str:
        return f"{self.keys[shard]}:owner"

    def consumers_key(self, shard: int) -> str:
        return f"{self.keys[shard]}:consumers"

    def next_key(self) -> str:
        """The key the next pop tries first; the others it tries are kept in `lost` when
        their reply does not come."""
        if not self.owned:
            return ""
        return self.batch_key(self.owned[self._turn % len(self.owned)], self._seq + 1)

    # --- batches

    async def pop(self, count: int) -> Batch | None:
        """Up to `count` records from the next owned shard that has some; None when every
        owned shard is empty (or none is owned)."""
        owned = list(self.owned)
        for i in range(len(owned)):
            shard = owned[(self._turn + i) % len(owned)]
            batch = await self._pop_shard(shard, count)
            if batch is not None:
                self._turn = (self._turn + i + 1) % max(1, len(self.owned))
                return batch
        return None

    async def _pop_shard(self, shard: int, count: int) -> Batch | None:
        self._seq += 1
        key = self.batch_key(shard, self._seq)
        keys = [self.keys[shard], key, self.inflight_key(shard), self.owner_key(shard), self.consumers_key(shard)]
        self.touched.add(shard)
        try:
            moved = await self._pop(self.client, keys, [count, self._seq, self.lease_ms, self.id])
            if moved == -1:
                self._lost_shard(shard, "its lease went to another consumer")
                return None
            if not moved:
                return None
            records = await self.client.lrange(key, 0, -1)
        except BaseException:
            self.lost.append(key)
            raise
        self.in_hand[shard] += 1
        return Batch(key, self._seq, records)

    async def ack(self, batch: Batch, dead_letters: list[bytes]) -> bool:
        shard = shard_of(batch.key)
        acked = bool(await self._ack(self.client, [batch.key, self.inflight_key(shard), self.dead[shard]],
                                     dead_letters))
        self.in_hand[shard] = max(0, self.in_hand[shard] - 1)
        return acked

    async def release(self, keys: list[str]) -> int:
        """Put these batches of ours (and pops whose reply was lost) back at the head of their shards."""
        by_shard: dict[int, list[str]] = {}
        for key in [*keys, *self.lost]:
            if key:
                by_shard.setdefault(shard_of(key), []).append(key)
        moved = 0
        for shard, batch_keys in by_shard.items():
            moved += int(await self._release(
                self.client, [self.keys[shard], self.inflight_key(shard), *dict.fromkeys(batch_keys)], []))
            self.in_hand[shard] = max(0, self.in_hand[shard] - len([k for k in batch_keys if k not in self.lost]))
        self.lost.clear()
        return moved

    # --- shards: lease, sharing, take-over

    async def renew_lease(self) -> None:
        await self._balance()

    async def recover(self) -> tuple[int, int]:
        """A lease round; (shards taken over, records put back from their previous owners)."""
        return await self._balance()

    async def _balance(self) -> tuple[int, int]:
        before = sorted(self.owned)
        live = int(await self._members(self.client, [self.members_key], [self.id, self.lease_ms]))
        share = len(self.candidates) if self.pinned else math.ceil(len(self.candidates) / max(1, live))
        for shard in list(self.owned):  # renew first: a lease let run out is someone else's
            if not await self._claim(self.client, [self.owner_key(shard)], [self.id, self.lease_ms]):
                self._lost_shard(shard, "its lease expired before it was renewed")
        for shard in list(self.owned):
            if len(self.owned) <= share:
                break
            if shard in self.owned and not self.in_hand[shard]:
                await self._give_back(shard)
        taken = records = 0
        order = self.candidates[self._start:] + self.candidates[:self._start]
        for shard in order:
            if len(self.owned) >= share:
                break
            if shard in self.owned:
                continue
            self.touched.add(shard)  # before: a claim whose reply is lost (a stop) is still given back
            if await self._claim(self.client, [self.owner_key(shard)], [self.id, self.lease_ms]):
                self.owned.append(shard)
                taken += 1
                records += await self._take_over_batches(shard)
        if sorted(self.owned) != before:
            log.info("shards held", extra={"shards": sorted(self.owned), "live_consumers": live,
                                           "records_recovered": records})
        return taken, records

    async def _take_over_batches(self, shard: int) -> int:
        """Put back at the head of a shard just claimed the batches its previous owners left
        in flight there (nobody else can add to them now)."""
        moved = 0
        for member in await self.client.smembers(self.consumers_key(shard)):
            other = member.decode() if isinstance(member, bytes) else member
            if other == self.id:
                continue
            zset = self.inflight_key(shard, other)
            batch_keys = [k.decode() if isinstance(k, bytes) else k for k in await self.client.zrange(zset, 0, -1)]
            result = int(await self._take_over(
                self.client, [self.keys[shard], self.owner_key(shard), self.consumers_key(shard), zset, *batch_keys],
                [self.id, other]))
            if result < 0:
                self._lost_shard(shard, "its lease went to another consumer")
                return moved
            moved += result
        if moved:
            log.warning("recovered the in-flight batches a gone consumer left in a shard",
                        extra={"shard": shard, "records": moved})
        return moved

    async def _give_back(self, shard: int) -> None:
        self.owned.remove(shard)  # first: no pop of ours goes there from now on
        await self._leave(self.client, [self.owner_key(shard), self.consumers_key(shard), self.inflight_key(shard)],
                          [self.id])
        log.info("gave a shard back to share them with another consumer", extra={"shard": shard})

    def _lost_shard(self, shard: int, why: str) -> None:
        if shard in self.owned:
            self.owned.remove(shard)
            log.warning("lost a shard: %s", why, extra={"shard": shard})

    async def leave(self) -> bool:
        """Give every shard back and unregister where no batch of ours is in flight."""
        clean = True
        for shard in sorted(self.touched):
            clean &= bool(await self._leave(
                self.client, [self.owner_key(shard), self.consumers_key(shard), self.inflight_key(shard)], [self.id]))
        self.owned.clear()
        await self.client.zrem(self.members_key, self.id)
        return clean

    # --- what --once and the progress report read

    async def in_flight_elsewhere(self) -> set[bytes]:
        found: set[bytes] = set()
        for shard in self.candidates:
            for member in await self.client.smembers(self.consumers_key(shard)):
                other = member.decode() if isinstance(member, bytes) else member
                if other != self.id:
                    found.update(await self.client.zrange(self.inflight_key(shard, other), 0, -1))
        return found

    async def exists(self, keys: set[bytes]) -> set[bytes]:
        return {key for key in keys if await self.client.exists(key)}

    async def depth(self) -> int:
        """Records waiting in the shards this consumer may take (every shard unless pinned),
        held by it or not."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.candidates:
            pipe.llen(self.keys[shard])
        lengths: list[Any] = await pipe.execute()
        return sum(int(n) for n in lengths)
