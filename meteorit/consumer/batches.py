"""The consumer's side of the Redis queue: batches moved atomically into in-flight lists,
acknowledged once the sink committed them, and put back when their consumer is gone.

Owns: the Lua scripts (SCRIPT LOAD once, then EVALSHA; loaded again on NOSCRIPT), the key
layout below, this consumer's lease and the dead-letter list. Must not touch: decoding
or storing records (consumer.rows and the sink modules do that).

Keys, for the queue Q (`redis.queue`) and a consumer id C (unique per process):

    Q                   the queue; meteorit's workers RPUSH records onto its tail
    Q:consumers         set of the consumer ids that may hold batches
    Q:lease:C           "1" with a PX expiry of `consumer.lease`, renewed while C runs
    Q:inflight:C        zset of C's batch keys, scored by their sequence number
    Q:batch:C:SEQ       list: one batch, in queue order, until it is acknowledged

A pop takes up to N records from the head of Q and, in the same script, stores them as
Q:batch:C:SEQ with `SORT Q BY nosort LIMIT 0 N STORE` (a native copy of the range: Redis
never turns the records into Lua strings, which cost 2.5x the Redis CPU of the whole
drain), then LTRIMs them off Q. The same MULTI reads the new list back. A batch is only
ever in Q or in an in-flight list, so a consumer that dies between pop and commit loses
nothing: once its lease has expired, `recover` pushes its batches back to the head of Q
in their original order. The ack (UNLINK of the batch) runs after the sink committed;
dying between commit and ack redelivers the batch, which the sinks absorb by event id.

Every pop renews the lease and re-registers C, so a batch key is always covered by a
live lease or recoverable. If C stalls past its lease and another consumer recovers its
batches, C's later acks find nothing to delete and change nothing (the records are
stored again by whoever pops them, and deduplicated by id).

These are the single queue's scripts (single and sentinel modes). RECOVER and
IN_FLIGHT_ELSEWHERE build the other consumers' keys inside Lua from Q and the members of
Q:consumers, which one Redis allows; Redis Cluster wants every key a script touches in
KEYS[], so cluster mode uses consumer/shards.py, where a lease per shard makes reading the
keys first and passing them race-free.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

log = logging.getLogger("meteorit.batches")

UNPACK_CHUNK = 4000  # Redis's Lua stack takes at most ~8000 arguments in one unpack()

POP = """
-- KEYS: queue, batch, inflight zset, lease, consumers; ARGV: count, seq, lease ms, consumer id
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
redis.call('SADD', KEYS[5], ARGV[4])
local n = redis.call('SORT', KEYS[1], 'BY', 'nosort', 'LIMIT', 0, ARGV[1], 'STORE', KEYS[2])
if n > 0 then
  redis.call('LTRIM', KEYS[1], n, -1)
  redis.call('ZADD', KEYS[3], ARGV[2], KEYS[2])
end
return n
"""

ACK = """
-- KEYS: batch, inflight zset, dead-letter list; ARGV: dead-letter entries
-- Dead letters are written only by the ack that removed the batch, so a retried ack
-- (its reply lost) or the ack of a batch recovered by another consumer adds nothing.
redis.call('ZREM', KEYS[2], KEYS[1])
if redis.call('UNLINK', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, %(chunk)d do
  redis.call('RPUSH', KEYS[3], unpack(ARGV, i, math.min(i + %(chunk)d - 1, #ARGV)))
end
return 1
""" % {"chunk": UNPACK_CHUNK}

# Shared by RECOVER and RELEASE: put the batches of one zset back at the head of the queue.
# LPUSH a, b, c leaves c first, so each chunk goes reversed, last chunk and last batch
# first: the head of the queue then reads batch 1, batch 2, ... in their original order.
_PUSH_BACK = """
local function push_back(queue, zkey, only)
  local moved = 0
  local batches = redis.call('ZRANGE', zkey, 0, -1)
  for b = #batches, 1, -1 do
    local key = batches[b]
    if only == nil or only[key] then
      local items = redis.call('LRANGE', key, 0, -1)
      local hi = #items
      while hi >= 1 do
        local lo = math.max(1, hi - %(chunk)d + 1)
        local chunk = {}
        for i = hi, lo, -1 do chunk[#chunk + 1] = items[i] end
        redis.call('LPUSH', queue, unpack(chunk))
        hi = lo - 1
      end
      moved = moved + #items
      redis.call('DEL', key)
      redis.call('ZREM', zkey, key)
    end
  end
  return moved
end
""" % {"chunk": UNPACK_CHUNK}

RECOVER = _PUSH_BACK + """
-- KEYS: queue, consumers; ARGV: key prefix (the queue name)
local records, consumers = 0, 0
for _, c in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[1] .. ':lease:' .. c) == 0 then
    records = records + push_back(KEYS[1], ARGV[1] .. ':inflight:' .. c, nil)
    redis.call('DEL', ARGV[1] .. ':inflight:' .. c)
    redis.call('SREM', KEYS[2], c)
    consumers = consumers + 1
  end
end
return {consumers, records}
"""

RELEASE = _PUSH_BACK + """
-- KEYS: queue, inflight zset; ARGV: batch keys of this consumer to put back
local only = {}
for _, key in ipairs(ARGV) do only[key] = true end
return push_back(KEYS[1], KEYS[2], only)
"""

LEAVE = """
-- KEYS: lease, consumers, inflight zset; ARGV: consumer id
-- A consumer that still holds batches keeps its registration: they are recovered later.
if redis.call('ZCARD', KEYS[3]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

IN_FLIGHT_ELSEWHERE = """
-- KEYS: consumers; ARGV: key prefix, this consumer's id. Batch keys of the other consumers.
local keys = {}
for _, c in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if c ~= ARGV[2] then
    for _, key in ipairs(redis.call('ZRANGE', ARGV[1] .. ':inflight:' .. c, 0, -1)) do
      keys[#keys + 1] = key
    end
  end
end
return keys
"""


class Script:
    """A Lua script known by its SHA-1; loaded on first use and again after NOSCRIPT."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def load(self, client: Redis) -> None:
        await client.script_load(self.source)

    async def __call__(self, client: Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            log.warning("script cache lost; loading the script again", extra={"script": self.name})
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


@dataclass
class Batch:
    """Records popped together; `key` is their in-flight list until the ack."""

    key: str
    seq: int
    records: list[bytes]
    popped_at: float = field(default_factory=time.monotonic)


class BatchQueue:
    """One consumer's view of the queue: pop, ack, lease, recovery."""

    def __init__(self, client: Redis, queue: str, dead_letter: str, consumer_id: str,
                 lease: float) -> None:
        self.client = client
        self.queue = queue
        self.dead_letter = dead_letter
        self.id = consumer_id
        self.lease_ms = max(1, int(lease * 1000))
        self.consumers_key = f"{queue}:consumers"
        self.lease_key = f"{queue}:lease:{consumer_id}"
        self.inflight_key = f"{queue}:inflight:{consumer_id}"
        self._seq = 0
        self._pop = Script("pop", POP)
        self._ack = Script("ack", ACK)
        self._recover = Script("recover", RECOVER)
        self._release = Script("release", RELEASE)
        self._leave = Script("leave", LEAVE)
        self._elsewhere = Script("in-flight-elsewhere", IN_FLIGHT_ELSEWHERE)

    async def load_scripts(self) -> None:
        for script in (self._pop, self._ack, self._recover, self._release, self._leave, self._elsewhere):
            await script.load(self.client)

    def batch_key(self, seq: int) -> str:
        return f"{self.queue}:batch:{self.id}:{seq}"

    def next_key(self) -> str:
        """The key the next pop will use, so a pop whose reply was lost can be released."""
        return self.batch_key(self._seq + 1)

    async def pop(self, count: int) -> Batch | None:
        """Up to `count` records from the head of the queue, now in flight; None when empty."""
        self._seq += 1
        key = self.batch_key(self._seq)
        keys = [self.queue, key, self.inflight_key, self.lease_key, self.consumers_key]
        args: list[str | int] = [count, self._seq, self.lease_ms, self.id]
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=True)
            pipe.evalsha(self._pop.sha, len(keys), *keys, *args)
            pipe.lrange(key, 0, -1)
            try:
                moved, records = await pipe.execute()
            except NoScriptError:
                if attempt == 2:
                    raise
                log.warning("script cache lost; loading the script again", extra={"script": "pop"})
                await self._pop.load(self.client)
                continue
            return Batch(key, self._seq, records) if moved else None
        return None

    async def ack(self, batch: Batch, dead_letters: list[bytes]) -> bool:
        """Drop the batch's in-flight list (and file its dead letters); False if it was gone."""
        keys = [batch.key, self.inflight_key, self.dead_letter]
        return bool(await self._ack(self.client, keys, dead_letters))

    async def renew_lease(self) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.lease_key, "1", px=self.lease_ms)
        pipe.sadd(self.consumers_key, self.id)
        await pipe.execute()

    async def recover(self) -> tuple[int, int]:
        """Put back the batches of consumers whose lease expired: (consumers, records)."""
        consumers, records = await self._recover(
            self.client, [self.queue, self.consumers_key], [self.queue])
        if consumers:
            log.warning("recovered the in-flight batches of consumers that are gone",
                        extra={"consumers": consumers, "records": records})
        return int(consumers), int(records)

    async def release(self, keys: list[str]) -> int:
        """Put this consumer's batches `keys` back at the head of the queue, in order."""
        if not keys:
            return 0
        return int(await self._release(self.client, [self.queue, self.inflight_key], keys))

    async def leave(self) -> bool:
        """Unregister, unless batches are still in flight (then they wait for recovery)."""
        return bool(await self._leave(self.client, [self.lease_key, self.consumers_key, self.inflight_key],
                                      [self.id]))

    async def in_flight_elsewhere(self) -> set[bytes]:
        return set(await self._elsewhere(self.client, [self.consumers_key], [self.queue, self.id]))

    async def exists(self, keys: set[bytes]) -> set[bytes]:
        """Which of these batch keys are still in flight."""
        if not keys:
            return set()
        ordered = list(keys)
        pipe = self.client.pipeline(transaction=False)
        for key in ordered:
            pipe.exists(key)
        found = await pipe.execute()
        return {key for key, present in zip(ordered, found) if present}

    async def depth(self) -> int:
        return int(await self.client.llen(self.queue))
