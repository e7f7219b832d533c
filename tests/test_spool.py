"""The spool's files and policy: the replay cursor, locks and adoption, damaged headers,
compaction, group commit, the size cap and a full disk (a real RLIMIT_FSIZE). The byte
format alone is tests/test_spool_format.py."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meteorit.config import load
from meteorit.errors import ConfigError, WriterUnavailable
from meteorit.worker import spool as sp
from meteorit.worker.spool import HEADER_SIZE, Spool, SpoolFile, encode_frame
from meteorit.worker.spool.file import READ_BLOCK, STALE_TMP_AGE
from meteorit.worker.spool.policy import WRITE_MAX


def flat(requests: list[list[bytes]]) -> list[bytes]:
    return [record for request in requests for record in request]


def sample_requests(n: int = 5) -> list[list[bytes]]:
    return [[b'{"type":"t","n":%d,"i":%d}' % (r, i) for i in range(3)] for r in range(n)]


# --- one file


def make_file(tmp_path: Path, requests: list[list[bytes]], fsync: str = sp.NEVER) -> SpoolFile:
    f = SpoolFile.create(str(tmp_path), durable=fsync != sp.NEVER)
    f.append([encode_frame(r) for r in requests], fsync)
    return f


@pytest.mark.parametrize("fsync", sp.FSYNC_MODES)
def test_append_read_advance_then_cut_back(tmp_path: Path, fsync: str) -> None:
    requests = sample_requests(10)
    f = make_file(tmp_path, requests, fsync)
    assert f.path.endswith(".spool") and not list(tmp_path.glob("*.tmp"))
    chunk = f.read(max_events=12, max_bytes=1 << 20)
    assert chunk.records == flat(requests[:4]) and chunk.problems == []
    f.advance(chunk.end)
    rest = f.read(max_events=1000, max_bytes=1 << 20)
    assert rest.records == flat(requests[4:])
    f.advance(rest.end)
    assert f.size == f.cursor == HEADER_SIZE == os.path.getsize(f.path)  # cut back once all in Redis
    f.close()


def test_an_adopter_resumes_at_the_cursor(tmp_path: Path) -> None:
    requests = sample_requests(6)
    f = make_file(tmp_path, requests)
    f.advance(f.read(max_events=6, max_bytes=1 << 20).end)
    f.close()  # the owner is gone (its lock with it)
    orphan = SpoolFile.adopt(f.path)
    assert orphan is not None and not orphan.owned
    assert orphan.read(1000, 1 << 20).records == flat(requests[2:])
    orphan.remove()
    assert not os.path.exists(f.path)


def test_a_live_owner_keeps_its_file(tmp_path: Path) -> None:
    f = make_file(tmp_path, sample_requests(1))
    assert SpoolFile.adopt(f.path) is None  # another open file description: the lock says no
    assert sp.find_orphan(str(tmp_path), own="") is None
    f.close()
    orphan = sp.find_orphan(str(tmp_path), own="")
    assert orphan is not None and orphan.path == f.path
    orphan.close()


def test_a_file_removed_by_another_adopter_is_left_alone(tmp_path: Path) -> None:
    f = make_file(tmp_path, sample_requests(1))
    f.close()
    first = SpoolFile.adopt(f.path)
    assert first is not None
    late_fd = os.open(f.path, os.O_RDWR)  # a second adopter opened it before the removal
    first.remove()
    assert os.fstat(late_fd).st_nlink == 0
    os.close(late_fd)
    assert SpoolFile.adopt(f.path) is None


def test_a_damaged_cursor_replays_everything(tmp_path: Path) -> None:
    requests = sample_requests(3)
    f = make_file(tmp_path, requests)
    f.advance(f.read(3, 1 << 20).end)
    f.close()
    with open(f.path, "r+b") as raw:
        raw.seek(10)
        raw.write(b"\xff")
    orphan = SpoolFile.adopt(f.path)
    assert orphan is not None and orphan.cursor == HEADER_SIZE  # duplicates rather than losses
    assert orphan.read(1000, 1 << 20).records == flat(requests)
    orphan.close()


def test_a_damaged_magic_replays_every_intact_record(tmp_path: Path) -> None:
    requests = sample_requests(3)
    f = make_file(tmp_path, requests)
    f.close()
    with open(f.path, "r+b") as raw:
        raw.write(b"XX")  # the file's magic, not its records
    orphan = sp.find_orphan(str(tmp_path), own="")
    assert orphan is not None and orphan.cursor == HEADER_SIZE
    assert orphan.read(1000, 1 << 20).records == flat(requests)
    orphan.close()


def test_an_entry_that_cannot_be_opened_does_not_block_the_ones_after_it(tmp_path: Path) -> None:
    (tmp_path / "0-aaaa.spool").mkdir()  # sorts first; opening it fails with EISDIR
    f = make_file(tmp_path, sample_requests(1))
    f.close()
    skipped: set[str] = set()
    orphan = sp.find_orphan(str(tmp_path), own="", skipped=skipped)
    assert orphan is not None and orphan.path == f.path
    assert skipped == {"0-aaaa.spool"}  # reported once, not on every tick
    orphan.close()


def test_a_foreign_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "stray.spool").write_bytes(b"not a spool file at all, longer than a header")
    assert sp.find_orphan(str(tmp_path), own="") is None
    assert (tmp_path / "stray.spool.bad").exists()


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    stale, fresh = tmp_path / "1-aa.tmp", tmp_path / "2-bb.tmp"
    for path in (stale, fresh):
        path.write_bytes(sp.encode_header(HEADER_SIZE))
    old = time.time() - 2 * STALE_TMP_AGE
    os.utime(stale, (old, old))
    assert sp.find_orphan(str(tmp_path), own="") is None
    assert not stale.exists() and fresh.exists()  # a fresh one may be a worker creating its file


def test_a_large_record_is_read_whole(tmp_path: Path) -> None:
    big = [b"x" * (3 * READ_BLOCK)]
    f = make_file(tmp_path, [[b"small"], big])
    chunk = f.read(max_events=100, max_bytes=10)
    assert chunk.records == [b"small"]
    f.advance(chunk.end)
    assert f.read(max_events=100, max_bytes=10).records == big
    f.close()


def test_compaction_keeps_what_is_not_replayed_and_rebases_a_chunk_read_before(tmp_path: Path) -> None:
    requests = sample_requests(10)
    f = make_file(tmp_path, requests)
    old_path = f.path
    f.advance(f.read(max_events=18, max_bytes=1 << 20).end)  # 6 of 10 requests replayed
    pending = f.read(max_events=3, max_bytes=1 << 20)  # pushed to Redis while an append comes
    assert pending.records == flat(requests[6:7])
    late = [b"late"]
    f.append([encode_frame(late)], sp.NEVER, limit=f.size)  # no room unless the front goes
    assert f.path != old_path and not os.path.exists(old_path)
    assert f.shift > 0 and os.path.getsize(f.path) == f.size < f.shift + f.size
    f.advance(pending.end, pending.shift)
    assert f.read(1000, 1 << 20).records == flat(requests[7:]) + late
    f.close()
    orphan = SpoolFile.adopt(f.path)  # what a successor finds after a crash
    assert orphan is not None and orphan.read(1000, 1 << 20).records == flat(requests[7:]) + late
    orphan.close()


def test_appends_with_room_leave_the_file_where_it_is(tmp_path: Path) -> None:
    f = make_file(tmp_path, sample_requests(4))
    path = f.path
    f.advance(f.read(max_events=6, max_bytes=1 << 20).end)
    f.append([encode_frame([b"more"])], sp.NEVER, limit=1 << 20)
    assert f.path == path and f.shift == 0
    f.close()


# --- the worker's spool: group commit, the cap, a full disk


async def submit_all(spool: Spool, requests: list[list[bytes]]) -> list[Any]:
    loop = asyncio.get_running_loop()
    futures = []
    for records in requests:
        fut: asyncio.Future[Any] = loop.create_future()
        spool.submit(records, fut.set_result)
        futures.append(fut)
    return list(await asyncio.gather(*futures))


def test_concurrent_requests_share_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    real_append = SpoolFile.append

    def counting_append(self: SpoolFile, frames: list[bytes], fsync: str, limit: int | None = None) -> None:
        writes.append(len(frames))
        real_append(self, frames, fsync, limit)

    monkeypatch.setattr(SpoolFile, "append", counting_append)

    async def scenario() -> None:
        spool = Spool(str(tmp_path / "spool"), sp.BATCH, 1 << 20)
        spool.open()
        assert await submit_all(spool, sample_requests(50)) == [None] * 50
        assert spool.events_spooled == 150
        assert writes == [50]  # fifty requests, one write and one fsync
        await spool.close()

    asyncio.run(scenario())
    [left] = list((tmp_path / "spool").glob("*.spool"))  # a backlog: kept for a successor
    orphan = SpoolFile.adopt(str(left))
    assert orphan is not None and orphan.read(1000, 1 << 20).records == flat(sample_requests(50))
    orphan.close()


def test_an_empty_spool_is_removed_at_close(tmp_path: Path) -> None:
    async def scenario() -> None:
        spool = Spool(str(tmp_path), sp.BATCH, 1 << 20)
        spool.open()
        await spool.close()

    asyncio.run(scenario())
    assert list(tmp_path.iterdir()) == []


def test_over_max_bytes_submit_refuses(tmp_path: Path) -> None:
    async def scenario() -> None:
        spool = Spool(str(tmp_path), sp.NEVER, 400)
        spool.open()
        spool.submit([b"a" * 200], lambda error: None)
        assert spool.accepting
        with pytest.raises(WriterUnavailable, match="spool is full"):
            spool.submit([b"b" * 200], lambda error: None)
        assert not spool.accepting
        await spool.close()

    asyncio.run(scenario())


def test_a_request_larger_than_the_spool_is_refused_without_marking_it_full(tmp_path: Path) -> None:
    async def scenario() -> None:
        spool = Spool(str(tmp_path), sp.NEVER, 8192)
        spool.open()
        assert spool.file is not None
        with pytest.raises(WriterUnavailable, match="larger than the spool"):
            spool.submit([b"x" * 9000], lambda error: None)
        assert spool.accepting  # /readyz: the others still fit
        assert await submit_all(spool, [[b"small"]]) == [None]
        await spool.advance(spool.file, await spool.read(spool.file, 100, 1 << 20))
        assert spool.accepting and spool.used == HEADER_SIZE
        await spool.close()

    asyncio.run(scenario())


def test_a_full_spool_accepts_again_once_replay_cut_it_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        spool = Spool(str(tmp_path), sp.NEVER, 4096)
        spool.open()
        assert spool.file is not None
        assert await submit_all(spool, [[b"a" * 1500], [b"b" * 1500]]) == [None, None]
        with pytest.raises(WriterUnavailable, match="spool is full"):
            spool.submit([b"c" * 1500], lambda error: None)
        assert not spool.accepting
        while (chunk := await spool.read(spool.file, 1, 1 << 20)).records:
            await spool.advance(spool.file, chunk)
        assert spool.file.size == HEADER_SIZE and spool.accepting
        await spool.close()

    asyncio.run(scenario())


def test_replayed_bytes_make_room_for_new_requests(tmp_path: Path) -> None:
    """A Redis that comes and goes: what a replay pushed does not count against max_bytes,
    and the file itself stays within it."""
    async def scenario() -> None:
        spool = Spool(str(tmp_path), sp.NEVER, 4096)
        spool.open()
        assert spool.file is not None
        first = [[b"%d" % i + b"a" * 900] for i in range(4)]
        assert await submit_all(spool, first) == [None] * 4
        await spool.advance(spool.file, await spool.read(spool.file, 3, 1 << 20))  # Redis went again
        second = [[b"%d" % i + b"b" * 900] for i in range(3)]
        assert await submit_all(spool, second) == [None] * 3
        assert os.path.getsize(spool.file.path) <= 4096
        assert spool.file.read(1000, 1 << 20).records == flat(first[3:] + second)
        await spool.close()

    asyncio.run(scenario())


def test_bytes_being_written_are_counted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncing, release = threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync

    def slow_fdatasync(fd: int) -> None:  # a disk whose fsync takes a while
        syncing.set()
        release.wait(10)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)

    async def scenario() -> None:
        spool = Spool(str(tmp_path), sp.BATCH, 8192)
        spool.open()
        loop = asyncio.get_running_loop()
        first: asyncio.Future[Any] = loop.create_future()
        spool.submit([b"a" * 4000], first.set_result)
        await loop.run_in_executor(None, syncing.wait, 10)  # written, its fsync running
        assert spool.used == HEADER_SIZE + len(encode_frame([b"a" * 4000]))
        second: asyncio.Future[Any] = loop.create_future()
        spool.submit([b"b" * 4000], second.set_result)  # 8,072 of 8,192 bytes: it fits
        release.set()
        assert [await first, await second] == [None, None]
        await spool.close()

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_group_commit_writes_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    real_append = SpoolFile.append

    def counting_append(self: SpoolFile, frames: list[bytes], fsync: str, limit: int | None = None) -> None:
        writes.append(len(frames))
        real_append(self, frames, fsync, limit)

    monkeypatch.setattr(SpoolFile, "append", counting_append)

    async def scenario() -> None:
        spool = Spool(str(tmp_path), sp.NEVER, 1 << 30)
        spool.open()
        big = [[b"x" * (WRITE_MAX * 2 // 5)] for _ in range(5)]
        assert await submit_all(spool, big) == [None] * 5
        assert writes == [2, 2, 1]  # not one write that a full disk would fail whole
        await spool.close()

    asyncio.run(scenario())


def test_config_refuses_a_spool_smaller_than_one_request() -> None:
    with pytest.raises(ConfigError, match="spool.max_bytes"):
        load(env={}, overrides={"spool.max_bytes": "1MiB", "limits.max_body": "1MiB"})
    cfg = load(env={}, overrides={"spool.max_bytes": "8KiB", "limits.max_body": "4KiB"})
    assert cfg.spool.max_bytes == 8192


def test_a_full_disk_fails_the_write_and_leaves_no_partial_record(tmp_path: Path) -> None:
    """RLIMIT_FSIZE is what a full disk looks like to a writer (EFBIG instead of ENOSPC);
    Python ignores SIGXFSZ, so the write fails instead of killing the process."""
    async def scenario() -> None:
        spool = Spool(str(tmp_path), sp.BATCH, 1 << 30)
        spool.open()
        assert spool.file is not None
        assert await submit_all(spool, sample_requests(3)) == [None] * 3
        size = spool.file.size
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
        try:
            [error] = await submit_all(spool, [[b"z" * 1000]])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert isinstance(error, OSError) and error.errno == errno.EFBIG
        assert os.path.getsize(spool.file.path) == spool.file.size == size  # cut back
        assert not spool.accepting and spool.write_errors == 1
        with pytest.raises(WriterUnavailable, match="cannot be written"):
            spool.submit([b"y"], lambda error: None)
        chunk = spool.file.read(1000, 1 << 20)
        assert chunk.records == flat(sample_requests(3)) and chunk.problems == []
        await spool.close()

    asyncio.run(scenario())


def test_a_bad_fsync_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync"):
        Spool(str(tmp_path), "sometimes", 1024)
