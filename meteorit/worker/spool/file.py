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
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
from dataclasses import dataclass

from .format import (DAMAGED_CURSOR, DAMAGED_MAGIC, FOREIGN, FRAME_MAGIC, HEADER_SIZE, Problem,
                     encode_header, parse_frames, parse_header)

log = logging.getLogger("meteorit.spool")

READ_BLOCK = 256 * 1024  # the least a replay read asks for
SUFFIX = ".spool"
TMP_SUFFIX = ".tmp"
STALE_TMP_AGE = 60.0  # a file still named .tmp this long after its creation was abandoned
COPY_BLOCK = 1024 * 1024  # bytes a compaction copies per read

# `[spool] fsync`: each record synced on its own, one fdatasync per write, or the page cache only
ALWAYS, BATCH, NEVER = "always", "batch", "never"
FSYNC_MODES = (ALWAYS, BATCH, NEVER)


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
