"""One spool file on disk: created and locked, appended to, read back, its cursor moved,
compacted, adopted from a process that is gone, removed.

Owns: the spool files under `[spool] dir` (their names, locks, writes, cut-backs and
removal) and finding the orphans. Must not touch: the event loop (everything here runs on
the spool thread, or inline with fsync "never"), Redis (the writer replays what is read
here), HTTP, the byte layout (spool/format.py).

One file per worker process, `<pid>-<random>.spool`, held with an exclusive
`fcntl.flock` for the life of the process. A file whose lock can be taken belongs to a
process that is gone (crashed, killed, or stopped with a backlog): any worker may adopt
it, replay it and remove it. Workers are replaced over time, so ownership is by lock,
never by slot. A file is created as `<stem>.tmp`, locked and given its header, then
renamed, so an adopter never finds an unlocked file being born; a `.tmp` older than
STALE_TMP_AGE was abandoned by a killed creator and is removed.

The header's cursor is the offset of the first record not yet replayed: `advance` moves
it after Redis acknowledged each replayed chunk, so a replay cut short (a worker killed
mid-way) resumes there and repeats at most one chunk. Our own file is cut back to its
header once everything in it is replayed.

A record is appended, and the request answered, only after the whole write (and fsync,
per `[spool] fsync`) succeeded; a failed write (disk full, file too large) is cut back
off the file, so the file never holds a partial record of a live process. A process
killed in the middle of a write leaves a torn record at the end: the reader skips it and
reports it, as it does damage (spool/format.py says how each is told and skipped). A file
with a damaged header replays every intact record; one that is no spool at all is set
aside as `<name>.bad`.

When an append needs room that the part already replayed holds (a Redis that comes and
goes), `compact` copies the records not yet replayed to a new file, which then takes the
old one's place.

Concurrent requests share one write() and one fsync (group commit), like the Redis
writer's RPUSH, up to WRITE_MAX bytes a write: a failed write fails every request in it. With `fsync = "batch"` or `"always"` every file operation runs in one
thread per worker (`ThreadPoolExecutor(1)`, so in submission order): an fsync takes
milliseconds and must not stall the event loop. With `"never"` they run inline: a write()
into the page cache takes microseconds, less than the hop to a thread and back (measured:
6,200 vs 121,000 spooled requests/s with one client, 127,000 vs 197,000 with 64).
Either way one place at a time touches a file, so an append never races a cut-back.

What counts against `max_bytes` is the header and the records not yet replayed. The part a
replay already pushed is freed when the file is cut back (everything replayed) or, when an
append needs the room first (a Redis that comes and goes), by `compact`: the records not yet
replayed are copied to a new file, which then takes the old one's place.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from ...errors import WriterUnavailable
from .format import (DAMAGED_CURSOR, DAMAGED_MAGIC, FOREIGN, FRAME_MAGIC, HEADER_SIZE, Problem,
                     encode_frame, encode_header, parse_frames, parse_header)

log = logging.getLogger("meteorit.spool")

READ_BLOCK = 256 * 1024  # the least a replay read asks for
SUFFIX = ".spool"
TMP_SUFFIX = ".tmp"
STALE_TMP_AGE = 60.0  # a file still named .tmp this long after its creation was abandoned
CLOSE_GRACE = 5.0  # seconds a closing spool waits for writes in progress
RETRY_AFTER_FAILURE = 1.0  # seconds the spool refuses after a failed write before trying again
WRITE_MAX = 1024 * 1024  # most bytes of one group-commit write (one oversized request goes alone)
COPY_BLOCK = 1024 * 1024  # bytes a compaction copies per read

ALWAYS, BATCH, NEVER = "always", "batch", "never"
FSYNC_MODES = (ALWAYS, BATCH, NEVER)

SpoolDone = Callable[[Exception | None], None]


# --- one spool file (used from the spool thread only)


@dataclass
class Chunk:
    records: list[bytes]
    end: int  # the cursor once these records are in Redis
    problems: list[Problem]
    start: int = 0  # the cursor the chunk was read at
    shift: int = 0  # the file's `shift` then: `advance` rebases `end` if a compaction came between


class SpoolFile:
    """An open, locked spool file: ours (appended to) or adopted from a process that is gone."""

    def __init__(self, path: str, fd: int, size: int, cursor: int, owned: bool) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.cursor = cursor
        self.owned = owned
        self.shift = 0  # bytes compactions dropped from the front, in all

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def backlog(self) -> int:
        """Bytes not yet replayed."""
        return self.size - self.cursor

    @classmethod
    def create(cls, directory: str, durable: bool, source: "SpoolFile | None" = None) -> "SpoolFile":
        """A new file of our own, locked before it gets the name adopters look for; with
        `source`, holding the records `source` has not replayed yet."""
        stem = f"{os.getpid()}-{secrets.token_hex(4)}"
        tmp = os.path.join(directory, stem + TMP_SUFFIX)
        path = os.path.join(directory, stem + SUFFIX)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        size = HEADER_SIZE
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, encode_header(HEADER_SIZE), 0)
            if source is not None:
                size = _copy_range(source.fd, source.cursor, source.size, fd, HEADER_SIZE)
            if durable:
                os.fsync(fd)
            os.rename(tmp, path)
            if durable:
                _fsync_directory(directory)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        return cls(path, fd, size, HEADER_SIZE, owned=True)

    @classmethod
    def adopt(cls, path: str) -> "SpoolFile | None":
        """The file at `path` locked, if its owner is gone; None if it is alive or the file
        went away (another worker adopted and removed it first)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        adopted = None
        try:  # whatever goes wrong, an fd not handed out is closed: its lock must not linger
            adopted = cls._lock_adopted(path, fd)
        finally:
            if adopted is None:
                os.close(fd)
        return adopted

    @classmethod
    def _lock_adopted(cls, path: str, fd: int) -> "SpoolFile | None":
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_nlink == 0 or os.stat(path).st_ino != st.st_ino:
                return None  # replayed and removed by another worker while we opened it
        except FileNotFoundError:
            return None
        cursor = _read_cursor(fd, st.st_size, path)
        if cursor is None:
            _set_aside(path)
            return None
        return cls(path, fd, max(st.st_size, cursor), cursor, owned=False)

    def append(self, frames: list[bytes], fsync: str, limit: int | None = None) -> None:
        """Write `frames` at the end; with `always` each one is synced on its own. On error
        the file is cut back to where it was, so it never ends in a partial record. When
        the file would outgrow `limit`, the part already replayed is dropped first."""
        total = sum(map(len, frames))
        if limit is not None and self.size + total > limit and self.cursor > HEADER_SIZE:
            self.compact(durable=fsync != NEVER)
        start = self.size
        try:
            if fsync == ALWAYS:
                for frame in frames:
                    self._write_at(frame, self.size)
                    os.fdatasync(self.fd)
            else:
                self._write_at(b"".join(frames) if len(frames) > 1 else frames[0], start)
                if fsync == BATCH:
                    os.fdatasync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, start)
            except OSError as exc:
                log.error("spool %s: cannot cut back a failed write: %s", self.name, exc)
            self.size = start
            raise

    def compact(self, durable: bool) -> None:
        """Move the records not yet replayed to a new file and drop this one. Safe at any
        point: until the new file has its name the old one holds everything, then both do
        until the old one is unlinked (a crash then means duplicates, not losses)."""
        new = SpoolFile.create(os.path.dirname(self.path), durable, source=self)
        dropped = self.cursor - HEADER_SIZE
        old_path, old_fd = self.path, self.fd
        self.path, self.fd, self.size, self.cursor = new.path, new.fd, new.size, new.cursor
        self.shift += dropped
        _unlink_quietly(old_path)
        os.close(old_fd)
        log.info("spool compacted: %d replayed bytes dropped", dropped,
                 extra={"spool": self.name, "bytes": self.size - HEADER_SIZE})

    def _write_at(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)  # raises at a file size limit or a full disk
            offset += written
            view = view[written:]
        self.size = offset

    def read(self, max_events: int, max_bytes: int) -> Chunk:
        """The next records from the cursor (at least one when any are left); the cursor
        itself moves only with `advance`, once Redis has them."""
        if not self.owned:
            self.size = os.fstat(self.fd).st_size
        pos = self.cursor
        if pos >= self.size:
            return Chunk([], pos, [], pos, self.shift)
        want = max(max_bytes, READ_BLOCK)
        while True:
            buf = os.pread(self.fd, min(want, self.size - pos), pos)
            at_eof = pos + len(buf) >= self.size
            parsed = parse_frames(buf, at_eof, max_events, max_bytes)
            if parsed.consumed or at_eof or not parsed.need:
                break
            want = parsed.need  # one record larger than a block: read it whole
        for problem in parsed.problems:
            problem.offset += pos
        return Chunk(parsed.records, pos + parsed.consumed, parsed.problems, pos, self.shift)

    def advance(self, end: int, shift: int | None = None) -> int:
        """Records before `end` (an offset when the file's shift was `shift`) are in Redis.
        Our own file is cut back to its header once everything in it is (appends run in
        this same thread, so none is lost). Returns the bytes of backlog this freed."""
        if shift is not None:
            end -= self.shift - shift
        freed = max(0, end - self.cursor)
        self.cursor = end
        if self.owned and end >= self.size:
            os.ftruncate(self.fd, HEADER_SIZE)
            self.size = self.cursor = HEADER_SIZE
        os.pwrite(self.fd, encode_header(self.cursor), 0)
        return freed

    def remove(self) -> None:
        """Unlink, then close (which drops the lock): a worker that opened the file in
        between finds it unlinked once it gets the lock, and leaves it."""
        try:
            _unlink_quietly(self.path)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _copy_range(src: int, start: int, end: int, dst: int, at: int) -> int:
    """Copy bytes [start, end) of `src` to `dst` at `at`; returns where the copy ends in `dst`."""
    while start < end:
        data = os.pread(src, min(COPY_BLOCK, end - start), start)
        if not data:
            break  # the source is shorter than it was said to be: copy what there is
        view = memoryview(data)
        while view:
            written = os.pwrite(dst, view, at)
            at += written
            view = view[written:]
        start += len(data)
    return at


def _read_cursor(fd: int, size: int, path: str) -> int | None:
    """Where replay starts, or None for a file that is no spool at all (set aside)."""
    name = os.path.basename(path)
    header = parse_header(os.pread(fd, HEADER_SIZE, 0), size)
    damage = header.damage
    if damage == DAMAGED_MAGIC and not _holds_a_record(fd, size):
        damage = FOREIGN
    if damage == FOREIGN:
        log.error("spool %s is not a spool file; set aside", name)
        return None
    if damage == DAMAGED_MAGIC:
        log.error("spool %s: damaged header, replaying every intact record (duplicates possible)", name)
    elif damage == DAMAGED_CURSOR:
        log.warning("spool %s: damaged cursor, replaying the whole file (duplicates possible)", name)
    return header.cursor


def _holds_a_record(fd: int, size: int) -> bool:
    """Whether a record magic appears after the header: a spool whose header is damaged,
    rather than a file that never was one (in a spool, it is found in the first block)."""
    pos = HEADER_SIZE
    while pos < size:
        block = os.pread(fd, READ_BLOCK, pos)
        if not block:
            return False
        if FRAME_MAGIC in block:
            return True
        pos += max(1, len(block) - len(FRAME_MAGIC) + 1)  # a magic may straddle two blocks
    return False


def _set_aside(path: str) -> None:
    try:
        os.rename(path, path + ".bad")
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_orphan(directory: str, own: str, skipped: set[str] | None = None) -> SpoolFile | None:
    """The first spool file in `directory` whose owner is gone, locked; stale temporary
    files of workers killed while creating theirs are removed on the way. An entry that
    cannot be opened (a directory, no permission) is skipped, reported once in `skipped`."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return None
    now = time.time()
    for name in names:
        path = os.path.join(directory, name)
        try:
            if name.endswith(TMP_SUFFIX):
                _remove_stale_tmp(path, now)
            elif name.endswith(SUFFIX) and path != own:
                orphan = SpoolFile.adopt(path)
                if orphan is not None:
                    return orphan
        except OSError as exc:
            if skipped is None or name not in skipped:
                log.error("spool %s cannot be adopted, skipped: %s", name, exc)
                if skipped is not None:
                    skipped.add(name)
    return None


def _remove_stale_tmp(path: str, now: float) -> None:
    try:
        if now - os.stat(path).st_mtime < STALE_TMP_AGE:
            return
    except FileNotFoundError:
        return
    # A header only (data is appended after the rename), or a compaction's copy of records
    # its old file still holds: nothing lost either way.
    stale = SpoolFile.adopt(path)
    if stale is not None:
        stale.remove()


# --- the worker's spool (event loop side)


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
