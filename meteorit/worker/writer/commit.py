"""The Redis writer of a worker: group commit of events into the queue list, and the
spool for when Redis cannot take them. The writer of single and sentinel modes; cluster
mode's (shards.py) is built on it.

Owns: the worker's only Redis connection (to `redis.url`, or to the primary the sentinels
name: a SentinelConnectionPool asks them again on every reconnect), and the decision where
a request's events go: Redis, or the worker's spool (meteorit/worker/spool/).
Requests hand it their records with a callback; while one RPUSH is in flight the next
requests wait, and the next RPUSH carries all of them (bounded by `batch_max_events` and
`batch_max_bytes`, and always whole requests, so a request is in Redis whole or not at
all). Each callback runs `done(None, spooled)` only after Redis acknowledged the RPUSH
that carried its records (spooled False) or the spool wrote them (spooled True).

Must not touch: HTTP or event validation. Nothing else in a worker talks to Redis.

The RPUSH is packed by hiredis (C) and goes over one redis-py connection driven
directly: redis-py's asyncio command path packs in Python and was 12% of a worker's CPU
on batches of 100 events. A broken connection is retried once (a Redis restart between
two writes); if Redis had applied the first try, the retry queues the same records again,
with the same ids, which the consumer's dedupe by id absorbs (at-least-once).

States:
- `ready` is False from a transport error until a background probe succeeds;
- `slow` is True from the moment an RPUSH is past `deadline` until Redis answers it. The
  RPUSH is not cancelled (Redis may still apply it: at-least-once), but its requests, and
  every request meanwhile, go to the spool and are answered from there;
- `queue_full` is True while the queue holds more than `max_queue_length` events, as the
  RPUSH replies (the new length, for free) and a once-a-second LLEN tell: then 503, so a
  stopped consumer cannot make Redis run out of memory;
- `replicas_short` (`redis.wait_replicas` N > 0: each RPUSH goes out with a `WAIT N
  timeout` on the same connection) is True from a WAIT that counted fewer than N, whose
  events then went to the spool too (duplicates, never losses), until a WAIT is met
  again: replays wait meanwhile (each tick asks with a short WAIT when no write does).
Without a spool (unit tests), an unreachable Redis or `max_pending_bytes` waiting is a 503.
Replaying spools: replay.py; what WAIT answers mean, and the replica probe: replicas.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable, Coroutine

import hiredis
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from ...errors import WriterUnavailable
from ...metrics import BATCH_BUCKETS, Histogram
from ..spool import Spool
from .replay import replay_spools
from .replicas import ReplicaWait
from .wire import TRANSPORT_ERRORS, exchange, pack_rpush

log = logging.getLogger("meteorit.writer")

PROBE_INTERVAL = 0.5  # seconds between probes while Redis is unreachable
HEARTBEAT = 1.0  # an idle connection sends LLEN this often: /readyz notices a dead Redis, the queue length stays known
SPOOL_FLUSH_GRACE = 5.0  # seconds a stopping writer waits for the spool's last writes
WAIT_MARGIN = 1.0  # seconds the WAIT reply may take beyond WAIT's own timeout (the socket's is the same)

Done = Callable[[Exception | None, bool], None]  # (error, spooled)
Request = tuple[list[bytes], int, Done]  # records, bytes, callback


class _Batch:
    """The requests of one group-commit RPUSH; `handed_over` once the spool answers them."""

    __slots__ = ("requests", "values", "size", "handed_over")

    def __init__(self, requests: list[Request], values: list[bytes], size: int) -> None:
        self.requests = requests
        self.values = values
        self.size = size
        self.handed_over = False


class RedisWriter(ReplicaWait):
    def __init__(self, url: str, queue: str, timeout: float, batch_max_events: int,
                 batch_max_bytes: int, max_pending_bytes: int, spool: Spool | None = None,
                 deadline: float = 2.0, max_queue_length: int = 0, wait_replicas: int = 0,
                 pool: ConnectionPool | None = None, mode: str = "single") -> None:
        if pool is None and url:
            pool = ConnectionPool.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.pool = pool  # None in cluster mode: the cluster client holds the connections
        self.conn = pool.make_connection() if pool is not None else None
        if self.conn is not None:
            # wire.exchange bounds each exchange itself: with a socket timeout, redis-py runs every
            # write in asyncio.wait_for, a new Task per RPUSH (4% of a worker's instructions).
            self.conn.socket_timeout = None
        self.mode = mode
        self.timeout = timeout
        self.wait_replicas = wait_replicas
        self.replicas_short = False  # the last WAIT fell short: replays wait for one that does not
        self.queue = queue.encode()
        self.batch_max_events = batch_max_events
        self.batch_max_bytes = batch_max_bytes
        self.max_pending_bytes = max_pending_bytes
        self.spool = spool
        self.deadline = deadline
        self.max_queue_length = max_queue_length
        self.waiting: deque[Request] = deque()
        self.current: _Batch | None = None  # the batch whose RPUSH is in flight
        self.pending_bytes = 0
        self.flushing = False
        self.replaying = False
        self.ready = True
        self.slow = False
        self.queue_full = False
        self.queue_length: int | None = None  # as the last RPUSH reply or LLEN said (meteoritctl top)
        self.closed = False
        self.idle = asyncio.Event()
        self.idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one command at a time on the one connection
        self._last_ok = 0.0
        # counters
        self.writes = 0
        self.write_errors = 0
        self.events_written = 0
        self.events_replayed = 0
        self.waits_short = 0
        self.batch_sizes = Histogram(BATCH_BUCKETS)  # events per acknowledged RPUSH, for /metrics

    async def start(self) -> None:
        """Check Redis once; an unreachable Redis is not fatal, the probe keeps trying."""
        try:
            await self._check_queue()
        except TRANSPORT_ERRORS as exc:
            self._went_down(exc)
        self._spawn(self._heartbeat())
        self.check_spools()  # what a predecessor left behind goes first

    # --- taking requests

    def submit(self, records: list[bytes], size: int, done: Done) -> None:
        """Queue one request's records for Redis, or hand them to the spool when Redis
        cannot take them now; raises WriterUnavailable when neither can (503)."""
        if self.closed:
            raise WriterUnavailable("shutting down")
        if self.queue_full:
            raise WriterUnavailable("queue unavailable: over redis.max_queue_length, the consumer is behind")
        if self.ready and not self.slow and self.pending_bytes + size <= self.max_pending_bytes:
            self.waiting.append((records, size, done))
            self.pending_bytes += size
            if not self.flushing:
                self.flushing = True
                self.idle.clear()
                self._spawn(self._flush_loop())
            return
        if self.spool is None:
            if not self.ready:
                raise WriterUnavailable("queue unavailable: redis unreachable")
            raise WriterUnavailable("queue unavailable: too many events waiting for redis")
        self.spool.submit(records, _answer_from_spool(done))

    @property
    def events_spooled(self) -> int:
        return self.spool.events_spooled if self.spool is not None else 0

    @property
    def refusal(self) -> str | None:
        """Why a request would get 503 now (for /readyz), or None while events are taken."""
        if self.closed:
            return "shutting down"
        if self.queue_full:
            return "queue over redis.max_queue_length"
        if self.ready and not self.slow:
            return None
        if self.spool is None:
            return "redis unreachable"
        return None if self.spool.accepting else "redis unavailable and the spool cannot take events"

    @property
    def redis_state(self) -> str:
        """One word for `meteoritctl top`: down (unreachable), slow (an RPUSH past the
        deadline), full (the queue over max_queue_length) or up."""
        return "down" if not self.ready else "slow" if self.slow else "full" if self.queue_full else "up"

    @property
    def spool_bytes(self) -> int:
        """Bytes of this worker's spool not replayed into Redis yet."""
        return self.spool.backlog if self.spool is not None else 0

    def spool_in_memory(self) -> int:
        """Hand every request still held in memory (the RPUSH in flight included) to the
        spool, which answers them; returns the number of events handed over."""
        if self.spool is None:
            return 0
        requests: list[Request] = []
        batch = self.current
        if batch is not None and not batch.handed_over:
            batch.handed_over = True
            requests.extend(batch.requests)
        while self.waiting:
            request = self.waiting.popleft()
            self.pending_bytes -= request[1]
            requests.append(request)
        for records, _, done in requests:
            _to_spool(self.spool, records, done)
        return sum(len(records) for records, _, _ in requests)

    async def drain(self, timeout: float) -> bool:
        """Refuse new events and wait until everything submitted is written; at the
        deadline what is still in memory goes to the spool. True if nothing was left out."""
        self.closed = True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except asyncio.TimeoutError:
            if self.spool is None:
                log.error("redis writer: %d events not written at the drain deadline",
                          sum(len(r) for r, _, _ in self.waiting))
                return False
            log.warning("redis writer: %d events spooled at the drain deadline", self.spool_in_memory())
        if self.spool is not None:
            return await self.spool.flushed(SPOOL_FLUSH_GRACE)
        return True

    async def spool_and_stop(self, stop: Callable[[], None]) -> None:
        """Fast stop: refuse new events, hand what memory holds to the spool, wait for the
        spool to write it (briefly), then `stop()`."""
        self.closed = True
        try:
            if self.spool is not None:
                count = self.spool_in_memory()
                if count:
                    log.info("redis writer: %d events spooled at a fast stop", count)
                await self.spool.flushed(SPOOL_FLUSH_GRACE)
        finally:
            stop()

    def apply(self, queue: str, wait_replicas: int) -> None:
        """A reload's hot settings: the queue's name, the replicas a write waits for."""
        self.queue = queue.encode()
        self.wait_replicas = wait_replicas

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        if self.conn is not None and self.pool is not None:
            await self.conn.disconnect()
            await self.pool.disconnect()
            sentinels = getattr(self.pool, "sentinel_manager", None)
            if sentinels is not None:  # sentinel mode: the connections that asked for the primary
                await sentinels.aclose()
        if self.spool is not None:
            await self.spool.close()

    # --- group commit

    def _take_batch(self) -> _Batch:
        waiting = self.waiting
        requests: list[Request] = []
        values: list[bytes] = []
        size = 0
        while waiting:
            records, nbytes, done = waiting[0]
            if values and (len(values) + len(records) > self.batch_max_events
                           or size + nbytes > self.batch_max_bytes):
                break
            requests.append(waiting.popleft())
            values.extend(records)
            size += nbytes
        return _Batch(requests, values, size)

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.waiting:
                batch = self.current = self._take_batch()
                error: Exception | None = None
                try:
                    if self.ready and not self.slow:
                        timer = loop.call_later(self.deadline, self._past_deadline) if self.spool else None
                        try:
                            error = await self._write(batch.values)
                        finally:
                            if timer is not None:
                                timer.cancel()
                    else:
                        error = WriterUnavailable("redis unreachable")
                except Exception as exc:  # a bug: the batch's requests still get an answer
                    log.exception("redis write failed")
                    error = exc
                finally:  # even when cancelled: `slow` must not outlive the slow RPUSH
                    self.current = None
                    self.pending_bytes -= batch.size
                    if batch.handed_over:
                        self._slow_write_done(error)
                if batch.handed_over:  # the spool answered them: this was the slow RPUSH
                    continue
                if error is not None and self.spool is not None:
                    for records, _, done in batch.requests:
                        _to_spool(self.spool, records, done)
                else:
                    for _, _, done in batch.requests:
                        _answer(done, error, False)
        finally:
            self.current = None
            self.flushing = False
            self.idle.set()

    def _past_deadline(self) -> None:
        """The RPUSH in flight is older than `deadline`: answer its requests and the ones
        behind it from the spool, and spool everything until Redis answers."""
        if not self.slow:
            self.slow = True
            log.warning("redis slower than %.1fs: spooling until it answers", self.deadline)
        self.spool_in_memory()

    def _slow_write_done(self, error: Exception | None) -> None:
        if self.slow:
            self.slow = False
            if error is None:
                log.info("redis answers again; replaying the spool")
                self.check_spools()

    async def _write(self, values: list[bytes]) -> Exception | None:
        error = await self._push(values)
        if error is None:
            self.writes += 1
            self.events_written += len(values)
            self.batch_sizes.observe(len(values))
        return error

    async def _push(self, values: list[bytes]) -> Exception | None:
        packed = pack_rpush(self.queue, values)
        try:
            if self.wait_replicas:  # read once: a reload may change it while this write waits
                wanted = self.wait_replicas
                length, replicas = await self._command(packed + self.pack_wait(wanted), 2)
            else:
                length = await self._command(packed)
        except TRANSPORT_ERRORS as exc:
            self.write_errors += 1
            self._went_down(exc)
            return exc
        except RedisError as exc:  # Redis answered with an error (OOM, WRONGTYPE, ...)
            self.write_errors += 1
            log.error("redis refused a write of %d events: %s", len(values), exc)
            return exc
        self._saw_queue_length(length)
        if self.wait_replicas:
            return self._saw_replicas(replicas, wanted)
        return None

    def _saw_queue_length(self, length: object) -> None:
        if isinstance(length, int):
            self.queue_length = length
        if not self.max_queue_length or not isinstance(length, int):
            return
        full = length > self.max_queue_length
        if full != self.queue_full:
            self.queue_full = full
            if full:
                log.warning("queue holds %d events, over redis.max_queue_length (%d): answering 503 "
                            "until it drains", length, self.max_queue_length)
            else:
                log.info("queue down to %d events: taking events again", length)
                self.check_spools()

    # --- the connection

    async def _command(self, packed: bytes, replies: int = 1) -> Any:
        """One packed command and its reply (or `replies` pipelined commands and their
        replies, a list); one retry when the connection broke. Timeouts are not retried,
        so a slow Redis costs one timeout, not several."""
        async with self._lock:
            reply = await self._exchange(packed, replies)
        self._last_ok = time.monotonic()
        return reply

    async def _exchange(self, packed: bytes, replies: int = 1) -> Any:
        limit = self.timeout if replies == 1 else self.timeout + WAIT_MARGIN
        for attempt in (1, 2):
            try:
                answers = await exchange(self.conn, packed, replies, limit, "redis")
            except RedisConnectionError:
                if attempt == 2:
                    raise
                continue
            for answer in answers:  # every reply was read: the connection stays in step
                if isinstance(answer, ResponseError):
                    raise answer
            return answers[0] if replies == 1 else answers
        raise AssertionError("unreachable")

    async def _check_queue(self) -> None:
        """LLEN of the queue: proves Redis answers and keeps the queue length known. A
        command error (the key holds another type) is left for the writes to report."""
        try:
            length = await self._command(hiredis.pack_command((b"LLEN", self.queue)))
        except TRANSPORT_ERRORS:
            raise
        except RedisError:
            return
        self._saw_queue_length(length)

    async def _heartbeat(self) -> None:
        while not self.closed:
            await asyncio.sleep(HEARTBEAT)
            if self.ready and not self.flushing and time.monotonic() - self._last_ok >= HEARTBEAT:
                try:
                    await self._check_queue()
                except TRANSPORT_ERRORS as exc:
                    self._went_down(exc)

    def _went_down(self, exc: BaseException) -> None:
        if self.ready:
            self.ready = False
            log.warning("redis unreachable, %s until it is back: %s",
                        "spooling" if self.spool is not None else "answering 503", exc)
            self._spawn(self._probe())

    async def _probe(self) -> None:
        while not self.ready and not self.closed:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._check_queue()
            except TRANSPORT_ERRORS:
                continue
            self.ready = True
            log.info("redis reachable again")
            self.check_spools()

    # --- replay

    def check_spools(self) -> None:
        """Start replaying our spool, then orphans, if Redis can take events (the
        worker's tick calls this once a second, and so does Redis coming back)."""
        if self.replicas_short and self.ready and not self.flushing and not self.replaying:
            self.replaying = True  # no traffic may come to tell: ask whether the replicas are back
            self._spawn(self._probe_replicas())
            return
        if self.spool is None or self.replaying or not self._can_replay():
            return
        self.replaying = True
        self._spawn(self._replay())

    def _can_replay(self) -> bool:
        return (self.ready and not self.slow and not self.queue_full and not self.closed
                and not self.replicas_short)

    def topology(self) -> dict[str, Any]:
        """Where events go, for /readyz, /metrics and `meteoritctl status`: the Redis node
        this worker writes to and whether it answers."""
        host = getattr(self.conn, "host", None)
        node = f"{host}:{getattr(self.conn, 'port', '')}" if host else getattr(self.conn, "path", "") or ""
        return {"mode": self.mode, "nodes": {node: {"shards": [0], "reachable": self.ready}},
                "shards": 1, "unreachable": [] if self.ready else [0]}

    def shard_counters(self) -> dict[str, dict[str, int]]:
        """Writes and errors per shard (cluster mode; one queue here: none)."""
        return {}

    def readiness_note(self) -> str:
        """What /readyz adds to its answer about the topology: nothing for one queue."""
        return ""

    async def _replay(self) -> None:
        try:
            await replay_spools(self)
        finally:
            self.replaying = False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _to_spool(spool: Spool | None, records: list[bytes], done: Done) -> None:
    assert spool is not None
    try:
        spool.submit(records, _answer_from_spool(done))
    except WriterUnavailable as exc:
        _answer(done, exc, False)


def _answer_from_spool(done: Done) -> Callable[[Exception | None], None]:
    return lambda error: _answer(done, error, error is None)


def _answer(done: Done, error: Exception | None, spooled: bool) -> None:
    try:
        done(error, spooled)
    except Exception:  # one failing callback must not strand the rest of the batch
        log.exception("answering a request failed")
