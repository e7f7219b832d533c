"""A worker's spool: how requests are written to its spool file and how much room they take.

Owns: the worker's own SpoolFile, group commit into it, the fsync mode and the spool
thread, the space counted against `[spool] max_bytes`, refusing for a while after a failed
write, reporting the damage a replay read finds, and handing orphans to the writer. Must
not touch: Redis (the writer decides when a request is spooled, replays what is read here
and then calls `advance`), HTTP, the bytes of the file (spool/file.py, spool/format.py).

Concurrent requests share one write() and one fsync (group commit), like the Redis
writer's RPUSH, up to WRITE_MAX bytes a write: a failed write fails every request in it.
With `fsync = "batch"` or `"always"` every file operation runs in one thread per worker
(`ThreadPoolExecutor(1)`, so in submission order): an fsync takes milliseconds and must
not stall the event loop. With `"never"` they run inline: a write() into the page cache
takes microseconds, less than the hop to a thread and back (measured: 6,200 vs 121,000
spooled requests/s with one client, 127,000 vs 197,000 with 64). Either way one place at a
time touches a file, so an append never races a cut-back.

What counts against `max_bytes` is the header and the records not yet replayed. The part a
replay already pushed is freed when the file is cut back (everything replayed) or, when an
append needs the room first (a Redis that comes and goes), by `compact`: the records not yet
replayed are copied to a new file, which then takes the old one's place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ...errors import WriterUnavailable
from .file import FSYNC_MODES, NEVER, Chunk, SpoolFile, find_orphan
from .format import HEADER_SIZE, encode_frame

log = logging.getLogger("meteorit.spool")

CLOSE_GRACE = 5.0  # seconds a closing spool waits for writes in progress
RETRY_AFTER_FAILURE = 1.0  # seconds the spool refuses after a failed write before trying again
WRITE_MAX = 1024 * 1024  # most bytes of one group-commit write (one oversized request goes alone)

SpoolDone = Callable[[Exception | None], None]


class Spool:
    """A worker's own spool file with group commit, and the adoption of orphans.

    `submit` queues one request's records; the flush task writes what is queued (up to
    WRITE_MAX bytes a write, on the spool thread, or inline with fsync "never") and then
    calls each `done(None)`, or `done(error)` when the write failed. Over `max_bytes`, or for
    a second after a failed write, `submit` raises WriterUnavailable (503 with Retry-After).

    The byte counts are the event loop's own, moved only on the loop (the thread's view of
    the file changes while a write runs): a request's bytes are `queued_bytes`, then
    `writing_bytes` while its write runs, then `stored` once written, until a replay frees
    them."""

    def __init__(self, directory: str, fsync: str, max_bytes: int) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}")
        self.directory = os.path.abspath(directory)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.file: SpoolFile | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.waiting: deque[tuple[bytes, int, SpoolDone]] = deque()
        self.queued_bytes = 0  # submitted, not yet in a write
        self.writing_bytes = 0  # in the write in progress
        self.stored = HEADER_SIZE  # our file's header and the records in it not replayed yet
        self.flushing = False
        self.failed_until = 0.0
        self.full_at = float("inf")  # `used` when a request found no room: full until replay frees some
        self.idle: asyncio.Event | None = None
        self.skipped: set[str] = set()  # entries of the directory that cannot be adopted (reported)
        self._flush_task: asyncio.Task[None] | None = None
        # counters
        self.events_spooled = 0
        self.write_errors = 0

    def open(self) -> None:
        """Create and lock our file (at worker boot, before serving)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.file = SpoolFile.create(self.directory, durable=self.fsync != NEVER)
        self.stored = HEADER_SIZE + self.file.backlog
        if self.fsync != NEVER:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="meteorit-spool")
        log.info("spool open", extra={"spool": self.file.name, "fsync": self.fsync})

    @property
    def used(self) -> int:
        """Bytes counted against `max_bytes`: the file once the replayed part is dropped,
        writes in progress and queued ones included."""
        return self.stored + self.writing_bytes + self.queued_bytes

    @property
    def backlog(self) -> int:
        """Bytes of our own file not yet replayed, writes in progress included."""
        return self.used - HEADER_SIZE

    @property
    def accepting(self) -> bool:
        return (self.file is not None and self.used < min(self.max_bytes, self.full_at)
                and time.monotonic() >= self.failed_until)

    def submit(self, records: list[bytes], done: SpoolDone) -> None:
        if self.file is None:
            raise WriterUnavailable("queue unavailable: no spool")
        if time.monotonic() < self.failed_until:
            raise WriterUnavailable("queue unavailable: redis unavailable and the spool cannot be written")
        frame = encode_frame(records)
        if len(frame) > self.max_bytes - HEADER_SIZE:
            # would not fit even in an empty spool: no sign the spool is full for the others
            raise WriterUnavailable("queue unavailable: redis unavailable and the request is larger "
                                    "than the spool (spool.max_bytes)")
        if self.used + len(frame) > self.max_bytes:
            self.full_at = min(self.full_at, self.used)
            raise WriterUnavailable("queue unavailable: redis unavailable and the spool is full")
        self.waiting.append((frame, len(records), done))
        self.queued_bytes += len(frame)
        if not self.flushing:
            self.flushing = True
            if self.idle is None:
                self.idle = asyncio.Event()
            self.idle.clear()
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_loop())

    def _take_batch(self) -> list[tuple[bytes, int, SpoolDone]]:
        """The next requests for one write: at least one, then up to WRITE_MAX bytes."""
        waiting = self.waiting
        batch = [waiting.popleft()]
        size = len(batch[0][0])
        while waiting and size + len(waiting[0][0]) <= WRITE_MAX:
            batch.append(waiting.popleft())
            size += len(batch[-1][0])
        self.queued_bytes -= size
        self.writing_bytes = size
        return batch

    async def _flush_loop(self) -> None:
        assert self.file is not None and self.idle is not None
        try:
            while self.waiting:
                batch = self._take_batch()
                frames = [frame for frame, _, _ in batch]
                error: Exception | None = None
                try:
                    await self._run(self.file.append, frames, self.fsync, self.max_bytes)
                    self.stored += self.writing_bytes
                except OSError as exc:
                    error = exc
                    self._write_failed(exc, self.writing_bytes)
                except Exception as exc:  # a bug: its requests still get an answer (503)
                    log.exception("spool write failed")
                    error = exc
                finally:
                    self.writing_bytes = 0
                for _, count, done in batch:
                    if error is None:
                        self.events_spooled += count
                    try:
                        done(error)
                    except Exception:  # one failing callback must not strand the others
                        log.exception("answering a spooled request failed")
        finally:
            self.flushing = False
            self.idle.set()

    def _write_failed(self, exc: OSError, size: int) -> None:
        self.write_errors += 1
        if time.monotonic() >= self.failed_until:
            log.error("spool write of %d bytes failed, refusing for %.0fs: %s",
                      size, RETRY_AFTER_FAILURE, exc, extra={"spool": self.file and self.file.name})
        self.failed_until = time.monotonic() + RETRY_AFTER_FAILURE

    async def flushed(self, timeout: float) -> bool:
        """Wait until every submitted record is written (or failed); False past `timeout`."""
        if not self.flushing or self.idle is None:
            return True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # --- replay support: the writer reads, pushes to Redis, then advances

    async def _run(self, fn: Callable[..., object], *args: object) -> object:
        """`fn(*args)` on the spool thread, or right here without one (fsync "never", or
        once the thread is shut down at close)."""
        if self.executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def read(self, spool_file: SpoolFile, max_events: int, max_bytes: int) -> Chunk:
        chunk = await self._run(spool_file.read, max_events, max_bytes)
        assert isinstance(chunk, Chunk)
        for problem in chunk.problems:
            if problem.kind == "torn":
                log.warning("spool %s: torn record of %d bytes at offset %d skipped (a write "
                            "was cut short when its process died)", spool_file.name,
                            problem.length, problem.offset)
            else:
                log.error("spool %s: %d corrupt bytes at offset %d skipped",
                          spool_file.name, problem.length, problem.offset)
        return chunk

    async def advance(self, spool_file: SpoolFile, chunk: Chunk) -> None:
        """`chunk` is in Redis: move the file's cursor past it."""
        freed = await self._run(spool_file.advance, chunk.end, chunk.shift)
        assert isinstance(freed, int)
        if spool_file is self.file and freed:
            self.stored -= freed
            self.full_at = float("inf")  # replay made room

    async def adopt_orphan(self) -> SpoolFile | None:
        assert self.file is not None
        orphan = await self._run(find_orphan, self.directory, self.file.path, self.skipped)
        assert orphan is None or isinstance(orphan, SpoolFile)
        return orphan

    async def remove(self, spool_file: SpoolFile) -> None:
        await self._run(spool_file.remove)

    async def release(self, spool_file: SpoolFile) -> None:
        """Give an adopted file back (its lock with it) for a later try."""
        await self._run(spool_file.close)

    async def close(self) -> None:
        """At worker exit: remove our file when nothing is left in it, else leave it (locked
        no more) for a successor to replay."""
        if not await self.flushed(CLOSE_GRACE) and self._flush_task is not None:
            self._flush_task.cancel()  # those requests stay unanswered: never acknowledged
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None
        spool_file, self.file = self.file, None
        if spool_file is None:
            return
        if spool_file.backlog > 0:
            log.warning("spool %s keeps %d bytes for a successor to replay",
                        spool_file.name, spool_file.backlog)
            spool_file.close()
        else:
            spool_file.remove()
