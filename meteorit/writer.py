"""The Redis writer of a worker: group commit of events into the queue list.

Owns: the worker's only Redis connection. Requests hand it their records with a
callback; while one RPUSH is in flight the next requests wait, and the next RPUSH
carries all of them (bounded by `batch_max_events` and `batch_max_bytes`, and always
whole requests, so a request is in Redis whole or not at all). Each callback runs only
after Redis acknowledged the RPUSH that carried its records.

Must not touch: HTTP or event validation. Nothing else in a worker talks to Redis.

The RPUSH is packed by hiredis (C) and goes over one redis-py connection driven
directly: redis-py's asyncio command path packs in Python and was 12% of a worker's CPU
on batches of 100 events. A broken connection is retried once (a Redis restart between
two writes); if Redis had applied the first try, the retry queues the same records again,
with the same ids, which the consumer's dedupe by id absorbs (at-least-once).

States: `ready` is False from a transport error until a background PING succeeds; in
between, `submit` refuses at once (the app answers 503) instead of stacking requests
behind connect timeouts. Bytes waiting are capped by `max_pending_bytes`.
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
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import WriterUnavailable
from .metrics import BATCH_BUCKETS, Histogram

log = logging.getLogger("meteorit.writer")

PROBE_INTERVAL = 0.5  # seconds between PINGs while Redis is unreachable
PING = hiredis.pack_command((b"PING",))
HEARTBEAT = 1.0  # an idle connection is PINGed this often, so /readyz notices a dead Redis

Done = Callable[[Exception | None], None]


class RedisWriter:
    def __init__(self, url: str, queue: str, timeout: float, batch_max_events: int,
                 batch_max_bytes: int, max_pending_bytes: int) -> None:
        self.pool = ConnectionPool.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.conn = self.pool.make_connection()
        self.queue = queue.encode()
        self.batch_max_events = batch_max_events
        self.batch_max_bytes = batch_max_bytes
        self.max_pending_bytes = max_pending_bytes
        self.waiting: deque[tuple[list[bytes], int, Done]] = deque()
        self.pending_bytes = 0
        self.flushing = False
        self.ready = True
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
        self.batch_sizes = Histogram(BATCH_BUCKETS)  # events per acknowledged RPUSH, for /metrics

    async def start(self) -> None:
        """Check Redis once; an unreachable Redis is not fatal, the probe keeps trying."""
        try:
            await self._command(PING)
        except (RedisError, OSError) as exc:
            self._went_down(exc)
        self._spawn(self._heartbeat())

    def submit(self, records: list[bytes], size: int, done: Done) -> None:
        """Queue one request's records; `done(None)` once Redis has them, `done(error)` if not."""
        if self.closed:
            raise WriterUnavailable("shutting down")
        if not self.ready:
            raise WriterUnavailable("queue unavailable: redis unreachable")
        if self.pending_bytes + size > self.max_pending_bytes:
            raise WriterUnavailable("queue unavailable: too many events waiting for redis")
        self.waiting.append((records, size, done))
        self.pending_bytes += size
        if not self.flushing:
            self.flushing = True
            self.idle.clear()
            self._spawn(self._flush_loop())

    async def drain(self, timeout: float) -> bool:
        """Refuse new events, wait until everything submitted is written; True if it was."""
        self.closed = True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.error("redis writer: %d events not written at the drain deadline",
                      sum(len(r) for r, _, _ in self.waiting))
            return False
        return True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.conn.disconnect()
        await self.pool.disconnect()

    def _take_batch(self) -> tuple[list[bytes], list[Done], int]:
        waiting = self.waiting
        values, callbacks = [], []
        size = 0
        while waiting:
            records, nbytes, done = waiting[0]
            if values and (len(values) + len(records) > self.batch_max_events
                           or size + nbytes > self.batch_max_bytes):
                break
            waiting.popleft()
            values.extend(records)
            callbacks.append(done)
            size += nbytes
        return values, callbacks, size

    async def _flush_loop(self) -> None:
        try:
            while self.waiting:
                values, callbacks, size = self._take_batch()
                error = await self._write(values) if self.ready else WriterUnavailable("redis unreachable")
                self.pending_bytes -= size
                for done in callbacks:
                    try:
                        done(error)
                    except Exception:  # one failing callback must not strand the rest of the batch
                        log.exception("answering a request of the batch failed")
        finally:
            self.flushing = False
            self.idle.set()

    async def _write(self, values: list[bytes]) -> Exception | None:
        try:
            await self._command(pack_rpush(self.queue, values))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.write_errors += 1
            self._went_down(exc)
            return exc
        except RedisError as exc:  # Redis answered with an error (OOM, WRONGTYPE, ...)
            self.write_errors += 1
            log.error("redis refused a write of %d events: %s", len(values), exc)
            return exc
        self.writes += 1
        self.events_written += len(values)
        self.batch_sizes.observe(len(values))
        return None

    async def _command(self, packed: bytes) -> object:
        """One packed command and its reply; one retry when the connection broke.
        Timeouts are not retried, so a slow Redis costs one timeout, not several."""
        async with self._lock:
            reply = await self._exchange(packed)
        self._last_ok = time.monotonic()
        return reply

    async def _exchange(self, packed: bytes) -> object:
        for attempt in (1, 2):
            try:
                await self.conn.send_packed_command(packed, check_health=False)
                return await self.conn.read_response()
            except RedisConnectionError:
                await self.conn.disconnect()
                if attempt == 2:
                    raise
            except (RedisTimeoutError, OSError):
                await self.conn.disconnect()  # a late reply must not answer the next command
                raise
        raise AssertionError("unreachable")

    async def _heartbeat(self) -> None:
        while not self.closed:
            await asyncio.sleep(HEARTBEAT)
            if self.ready and not self.flushing and time.monotonic() - self._last_ok >= HEARTBEAT:
                try:
                    await self._command(PING)
                except (RedisError, OSError) as exc:
                    self._went_down(exc)

    def _went_down(self, exc: BaseException) -> None:
        if self.ready:
            self.ready = False
            log.warning("redis unreachable, answering 503 until it is back: %s", exc)
            self._spawn(self._probe())

    async def _probe(self) -> None:
        while not self.ready:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._command(PING)
            except (RedisError, OSError):
                continue
            self.ready = True
            log.info("redis reachable again")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)



def pack_rpush(queue: bytes, values: list[bytes]) -> bytes:
    """The wire bytes of one group-commit RPUSH, packed in C."""
    return hiredis.pack_command((b"RPUSH", queue, *values))
