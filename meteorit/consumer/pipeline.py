"""The consumer's pipeline: asyncio tasks joined by bounded queues, the Python form of
goroutines and channels:

    fetch:  pop a batch (consumer.batches) -> decode it (consumer.rows) -> `fetched` queue
    store:  `consumer.concurrency` batches in hand at most; the sink's writers commit them
            (consumer.sink) -> ack, with the batch's dead letters
    lease:  renews this consumer's lease; recovers the batches of consumers that are gone
    report: consumer.progress, from the counters the store task adds to

Owns: the Consumer (its tasks, queues, retries, lease and stop), the batches in hand and
the exit code. Must not touch: the Redis keys (consumer.batches), the databases (the sink
modules), the command line or the process's signal handlers (consumer.command).

Failures never lose a batch: Redis or the sink being down means a retry with backoff,
the batch staying in hand (and in its in-flight list). A stop (`handle_stop`: TERM or
INT) stops fetching, lets the batches in hand be committed and acknowledged, unregisters
and exits 0; if the sink is still down STOP_TIMEOUT later (or at a second stop), the
batches left are pushed back to the head of the queue and the exit code is 1. A call
that hangs (a sink waiting on a lock) is cancelled at that moment too: a stop never
waits on the sink for longer. A sink gone for good (SinkFailed: stdout closed) stops the
consumer the same way, exit 1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from .. import config, topology
from .batches import Batch, BatchQueue
from .shards import ShardedQueue
from .progress import Counters, Progress
from .rows import WIDTH, Rows, dead_letter, decode
from .sink import Sink, SinkFailed, SinkUnavailable, Written

log = logging.getLogger("meteorit.consumer")

EXIT_OK = 0
EXIT_FAILED = 1  # batches left unstored at exit (the command: a config error too; argparse exits 2)
STOP_TIMEOUT = 30.0  # after TERM, how long the batches in hand may wait for the sink
LAST_TRY = 2.0  # a call made once stopping is given up (an ack of a stored batch) gets this long
CANCEL_WAIT = 1.0  # for a cancelled call to clean up (asyncpg cancelling its COPY)
CANCEL_ROUNDS = 3
DUPLICATE_IDS_LOGGED = 20
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
IDLE_MIN, IDLE_MAX = 0.01, 0.5  # polling an empty queue, doubling up to the max
ONCE_IDLE_MAX = 0.1
ERROR_CHARS = 160  # of an error message in the log
RETRYABLE = (RedisError, RedisClusterException, OSError, SinkUnavailable)

T = TypeVar("T")


class Abandoned(Exception):
    """Stopping took longer than STOP_TIMEOUT (or a second signal came): give up retrying."""


class Consumer:
    """One consumer process: the pipeline, its lease and its counters."""

    def __init__(self, cfg: config.Config, sink: Sink, consumer_id: str, *, once: bool = False,
                 live: bool = False, shards: list[int] | None = None) -> None:
        self.cfg = cfg
        self.sink = sink
        self.id = consumer_id
        self.once = once
        self.batch_size = cfg.consumer.batch
        self.counters = Counters()
        self.progress = Progress(self.counters, self._depth, lambda: len(self.holding), live=live,
                                 every=cfg.consumer.stats_interval, sink_on_stdout=sink.to_stdout)
        # one try: the loops below back off themselves (sentinel mode: each reconnect asks
        # the sentinels for the primary, so a failover is followed)
        self.client = topology.client(cfg, cfg.redis_connect_url, retry=Retry(NoBackoff(), 0))
        self.queue: BatchQueue | ShardedQueue
        if cfg.redis.mode == config.CLUSTER:  # every shard, or those pinned (`shards`), shared by lease
            self.queue = ShardedQueue(self.client, cfg.redis.queue, cfg.consumer.dead_letter, consumer_id,
                                      cfg.consumer.lease, cfg.redis.shards, shards)
        else:
            self.queue = BatchQueue(self.client, cfg.redis.queue, cfg.consumer.dead_letter, consumer_id,
                                    cfg.consumer.lease)
        # batches in hand: popped, not yet acknowledged
        self.fetched: asyncio.Queue[tuple[Batch, Rows] | None] = asyncio.Queue(cfg.consumer.concurrency)
        self.holding: dict[str, Batch] = {}
        self.nothing_in_hand = asyncio.Event()
        self.nothing_in_hand.set()
        self.orphans: list[str] = []  # pops whose reply was lost: maybe moved, surely not ours
        self.stopping = asyncio.Event()
        self.abandon = asyncio.Event()
        self.failures: dict[str, int] = {}
        self._waiting_for: set[bytes] | None = None  # --once: other consumers' batches

    # --- process

    def handle_stop(self, signame: str) -> None:
        if self.stopping.is_set():
            self.abandon.set()
            return
        log.info("stopping: finishing the batches in hand", extra={"signal": signame,
                                                                  "in_hand": len(self.holding)})
        self.stopping.set()
        asyncio.get_running_loop().call_later(STOP_TIMEOUT, self.abandon.set)

    async def run(self) -> int:
        """Start up, drain until stopped (or, --once, until nothing is left), shut down; the
        exit code. The caller routes TERM and INT to handle_stop."""
        log.info("consumer starting", extra={
            "queue": self.cfg.redis.queue, "sink": self.sink.kind, "batch": self.batch_size,
            "concurrency": self.cfg.consumer.concurrency, "once": self.once})
        start_up = (("reach redis", self.queue.load_scripts), ("open the sink", self.sink.open),
                    ("recover batches of consumers that are gone", self.queue.recover))
        try:  # nothing is in hand yet: a stop ends these retries at once
            for what, step in start_up:
                if self.stopping.is_set():
                    raise Abandoned(what)
                await self._retry(what, step, give_up=self.stopping)
        except Abandoned:  # stopped before anything was popped
            await self._shutdown()
            self.progress.summary()
            return EXIT_OK
        helpers = [asyncio.create_task(self._keep_lease()), asyncio.create_task(self.progress.run())]
        pipeline = [asyncio.create_task(self._fetch())]
        pipeline += [asyncio.create_task(self._store()) for _ in range(self.sink.writers)]
        failure: BaseException | None = None
        try:
            done, _ = await asyncio.wait(pipeline, return_when=asyncio.FIRST_EXCEPTION)
            errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
            failure = next((e for e in errors if not isinstance(e, Abandoned)), None)
        finally:
            self.stopping.set()  # so that a loop whose cancellation was swallowed ends anyway
            await stop_tasks(pipeline + helpers)
        if isinstance(failure, SinkFailed):  # stop whole, with what is in hand back in the queue
            log.error("the sink can take nothing more; stopping", extra={"error": str(failure)})
        elif failure is not None:  # a bug: the same
            log.error("consumer failed", exc_info=failure)
        left = await self._shutdown()
        self.progress.summary()
        return EXIT_OK if not left and failure is None else EXIT_FAILED

    async def _shutdown(self) -> int:
        """Put back what was not stored, unregister, close. Returns the batches left."""
        left = list(self.holding)
        try:
            if self.orphans or left:
                released = await self.queue.release(self.orphans + left)
                log.error("left batches unstored; pushed them back to the queue",
                          extra={"batches": len(left), "records": released})
            await self.queue.leave()
        except RETRYABLE as exc:
            log.log(logging.ERROR if left else logging.WARNING,
                    "could not unregister; the lease will expire and another consumer recovers "
                    "what was in flight", extra={"error": brief(exc)})
        try:
            await self.sink.close()
        except RETRYABLE as exc:
            log.warning("closing the sink failed", extra={"error": brief(exc)})
        await topology.aclose(self.client)
        return len(left)

    # --- pipeline

    async def _fetch(self) -> None:
        idle = IDLE_MIN
        while not self.stopping.is_set():
            batch = await self._pop()
            if batch is None:
                if self.once and await self._drained():
                    break
                await self._nap(idle)
                idle = min(idle * 2, ONCE_IDLE_MAX if self.once else IDLE_MAX)
                continue
            idle = IDLE_MIN
            self._waiting_for = None
            self.holding[batch.key] = batch
            self.nothing_in_hand.clear()
            await self.fetched.put((batch, decode(batch.records)))
        for _ in range(self.sink.writers):
            await self.fetched.put(None)

    async def _pop(self) -> Batch | None:
        """One pop; transport errors back off here (the loop checks `stopping`)."""
        key = self.queue.next_key()
        try:
            if self.orphans:
                await self.queue.release(self.orphans)
                self.orphans.clear()
            batch = await self.queue.pop(self.batch_size)
        except asyncio.CancelledError:  # the pipeline stops: that pop may have moved a batch
            self.orphans.append(key)
            raise
        except RETRYABLE as exc:
            if key not in self.orphans:
                self.orphans.append(key)
            self._failed("pop a batch", exc)
            await self._nap(self._backoff("pop a batch"))
            return None
        self._recovered("pop a batch")
        return batch

    async def _store(self) -> None:
        while True:
            item = await self.fetched.get()
            if item is None:
                return
            batch, rows = item
            if self.abandon.is_set():  # given up: this one goes back to the queue
                raise Abandoned("store a batch")
            written = Written(0, [])
            if len(rows):
                written = await self._retry("store a batch", self.sink.write, rows)
            dead = [dead_letter(record, reason, self.id) for record, reason in rows.dead + written.rejected]
            acked = await self._retry("acknowledge a batch", self.queue.ack, batch, dead)
            del self.holding[batch.key]
            if not self.holding:
                self.nothing_in_hand.set()
            if not acked:  # recovered by another consumer meanwhile: its dead letters are not ours to file
                log.warning("a batch was recovered by another consumer before its ack; it is stored "
                            "again from the queue (duplicates skipped)", extra={"batch": batch.key})
            self._count(rows, written, dead=len(dead) if acked else 0)

    def _count(self, rows: Rows, written: Written, dead: int) -> None:
        c = self.counters
        stored = len(rows) - len(written.rejected)
        duplicates = stored - written.inserted
        c.stored += written.inserted
        c.duplicates += duplicates
        c.dead += dead
        c.batches += 1
        c.newest_received_at = max(c.newest_received_at, rows.newest_received_at)
        if duplicates and log.isEnabledFor(logging.DEBUG):
            log.debug("events skipped: their id is stored already", extra={
                "count": duplicates, "ids_repeated_in_batch": repeated_ids(rows)[:DUPLICATE_IDS_LOGGED]})
        if dead:
            log.warning("records sent to the dead-letter list", extra={
                "count": dead, "list": self.cfg.consumer.dead_letter,
                "reasons": sorted({reason for _, reason in rows.dead + written.rejected})[:5]})

    async def _drained(self) -> bool:
        """--once: the queue looked empty. Done when nothing is left anywhere: our batches
        stored, expired leases recovered, and the batches other consumers held at that
        moment acknowledged by them (or recovered and drained by us)."""
        await self.nothing_in_hand.wait()
        stop = self.stopping  # nothing in hand: no reason to wait past a stop
        _, records = await self._retry("recover batches of consumers that are gone", self.queue.recover,
                                       give_up=stop)
        if records or await self._retry("read the queue length", self.queue.depth, give_up=stop):
            return False
        if self._waiting_for is None:
            self._waiting_for = await self._retry("list in-flight batches", self.queue.in_flight_elsewhere,
                                                  give_up=stop)
        self._waiting_for = await self._retry("list in-flight batches", self.queue.exists, self._waiting_for,
                                              give_up=stop)
        return not self._waiting_for

    # --- lease

    async def _keep_lease(self) -> None:
        lease = self.cfg.consumer.lease
        next_recovery = time.monotonic() + lease
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await self.queue.renew_lease()
                if time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + lease
                    await self.queue.recover()
                self._recovered("renew the lease")
            except RETRYABLE as exc:
                self._failed("renew the lease", exc)

    async def _depth(self) -> int | None:
        """The queue's length for the progress report; None while Redis cannot say."""
        try:
            return await self.queue.depth()
        except RETRYABLE:
            return None

    # --- retries

    async def _retry(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any,
                     give_up: asyncio.Event | None = None) -> T:
        """Call fn until it succeeds; back off on transport and sink errors. Raises Abandoned
        once `give_up` is set (by default `abandon`: the batches in hand have had their time),
        cancelling a call still under way."""
        give_up = self.abandon if give_up is None else give_up
        while True:
            try:
                result = await self._attempt(what, fn, args, give_up)
            except RETRYABLE as exc:
                self._failed(what, exc)
                if give_up.is_set():
                    raise Abandoned(what) from exc
                await self._nap(self._backoff(what), give_up)
                continue
            self._recovered(what)
            return result

    @staticmethod
    async def _attempt(what: str, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
                       give_up: asyncio.Event) -> T:
        """One call of fn, raced against `give_up`: a call that hangs (a sink waiting on a lock
        held elsewhere) must not outlive a stop. Given up already: one last try of LAST_TRY s."""
        call = asyncio.ensure_future(fn(*args))
        signalled = asyncio.ensure_future(give_up.wait())
        try:
            if give_up.is_set():
                await asyncio.wait([call], timeout=LAST_TRY)
            else:
                await asyncio.wait([call, signalled], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # we are cancelled (the pipeline stops): so is the call
            call.cancel()
            raise
        finally:
            signalled.cancel()
        if call.done():
            return call.result()
        call.cancel()
        await asyncio.wait([call], timeout=CANCEL_WAIT)  # its clean-up, within bounds
        if call.done() and not call.cancelled():
            call.exception()  # retrieved: it ended with an error while cancelled, as expected
        raise Abandoned(what)

    def _backoff(self, what: str) -> float:
        return min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(self.failures.get(what, 1) - 1, 10))

    def _failed(self, what: str, exc: BaseException) -> None:
        n = self.failures[what] = self.failures.get(what, 0) + 1
        if n == 1 or n % 20 == 0:  # an outage is logged when it starts, then now and then
            log.warning("cannot %s; retrying with backoff", what,
                        extra={"error": brief(exc), "attempts": n})

    def _recovered(self, what: str) -> None:
        n = self.failures.pop(what, 0)
        if n:
            log.info("can %s again", what, extra={"after_attempts": n})

    async def _nap(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Sleep, cut short by `wake` (the stop event by default)."""
        event = self.stopping if wake is None else wake
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass


async def stop_tasks(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait for them to end. redis-py can swallow a cancellation (one came
    during a pop, the pop returned a batch and the fetch went on to wait on a full queue for
    ever): a task still running after CANCEL_WAIT is cancelled again."""
    pending = set(tasks)
    for _ in range(CANCEL_ROUNDS):
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_WAIT)
        if not pending:
            break
    else:
        log.warning("tasks still running after being cancelled", extra={"tasks": len(pending)})
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: run() looked at the ones that matter


def repeated_ids(rows: Rows) -> list[str]:
    """Ids that come more than once in one batch: a client reusing an id for another event."""
    seen: set[str] = set()
    repeated: dict[str, None] = {}
    for ident in rows.columns[0::WIDTH]:
        if ident in seen:
            repeated[ident] = None
        seen.add(ident)
    return list(repeated)


def brief(exc: BaseException) -> str:
    """An error for the log, cut short: a driver's message may quote the data."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + "..."
