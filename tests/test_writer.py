"""The Redis writer against a real redis-server: group commit, bounds, Redis going away,\nand with a spool: Redis down, past the deadline, the queue length cap, drain, orphans."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import redis as redislib

from conftest import RedisServer, free_port, kill_group, wait_until
from meteorit.errors import WriterUnavailable
from meteorit.worker.spool import Spool, SpoolFile, encode_frame
from meteorit.worker.writer import RedisWriter

QUEUE = "test:queue"


def make_writer(url: str, **overrides: Any) -> RedisWriter:
    settings: dict[str, Any] = dict(timeout=2.0, batch_max_events=10000, batch_max_bytes=1 << 20,
                                    max_pending_bytes=1 << 24)
    settings.update(overrides)
    return RedisWriter(url, QUEUE, **settings)


def submit_requests(writer: RedisWriter, count: int, per_request: int) -> list[asyncio.Future[Any]]:
    loop = asyncio.get_running_loop()
    futures = []
    for r in range(count):
        fut: asyncio.Future[Any] = loop.create_future()
        records = [b"r%d-e%d" % (r, e) for e in range(per_request)]
        writer.submit(records, sum(map(len, records)), lambda err, spooled, f=fut: f.set_result(err))
        futures.append(fut)
    return futures


def test_requests_waiting_together_share_one_rpush(redis: redislib.Redis,
                                                   redis_server: RedisServer) -> None:
    async def scenario() -> None:
        writer = make_writer(redis_server.url)
        futures = submit_requests(writer, 200, 3)
        assert await asyncio.gather(*futures) == [None] * 200
        assert (writer.writes, writer.events_written) == (1, 600)
        await writer.close()

    asyncio.run(scenario())
    assert redis.lrange(QUEUE, 0, 2) == [b"r0-e0", b"r0-e1", b"r0-e2"]
    assert redis.llen(QUEUE) == 600


def test_batches_are_bounded_and_keep_requests_whole(redis: redislib.Redis,
                                                     redis_server: RedisServer) -> None:
    async def scenario() -> None:
        writer = make_writer(redis_server.url, batch_max_events=10)
        futures = submit_requests(writer, 31, 4)
        assert await asyncio.gather(*futures) == [None] * 31
        # whole requests of 4 events, at most 10 events an RPUSH: 2 requests each
        assert writer.writes == 16
        await writer.close()

    asyncio.run(scenario())
    values = redis.lrange(QUEUE, 0, -1)
    assert values == [b"r%d-e%d" % (r, e) for r in range(31) for e in range(4)]


def test_pending_bytes_are_capped() -> None:
    async def scenario() -> None:
        writer = make_writer(f"redis://127.0.0.1:{free_port()}", max_pending_bytes=100)
        writer.submit([b"x" * 60], 60, lambda err, spooled: None)
        with pytest.raises(WriterUnavailable, match="too many events"):
            writer.submit([b"y" * 60], 60, lambda err, spooled: None)
        await writer.drain(5)
        await writer.close()

    asyncio.run(scenario())


def test_unreachable_redis_fails_requests_then_refuses_until_back(redis_server: RedisServer,
                                                                  redis: redislib.Redis) -> None:
    async def scenario() -> None:
        writer = make_writer(redis_server.url)
        await writer.start()
        assert writer.ready
        redis_server.stop()
        [error] = await asyncio.gather(*submit_requests(writer, 1, 1))
        assert isinstance(error, redislib.ConnectionError)
        assert not writer.ready
        with pytest.raises(WriterUnavailable, match="unreachable"):
            writer.submit([b"z"], 1, lambda err, spooled: None)
        redis_server.start()
        for _ in range(100):
            if writer.ready:
                break
            await asyncio.sleep(0.05)
        assert writer.ready
        assert await asyncio.gather(*submit_requests(writer, 1, 1)) == [None]
        await writer.close()

    asyncio.run(scenario())
    assert redis_server.client.llen(QUEUE) == 1


def test_drain_writes_everything_submitted_and_refuses_more(redis: redislib.Redis,
                                                            redis_server: RedisServer) -> None:
    async def scenario() -> None:
        writer = make_writer(redis_server.url)
        futures = submit_requests(writer, 50, 2)
        assert await writer.drain(5)
        assert all(f.done() and f.result() is None for f in futures)
        with pytest.raises(WriterUnavailable, match="shutting down"):
            writer.submit([b"late"], 4, lambda err, spooled: None)
        await writer.close()

    asyncio.run(scenario())
    assert redis.llen(QUEUE) == 100


# --- with a spool: Redis away, slow or full


def make_spooling_writer(url: str, directory: Path, **overrides: Any) -> RedisWriter:
    spool = Spool(str(directory), "batch", overrides.pop("spool_max_bytes", 1 << 24))
    spool.open()
    return make_writer(url, spool=spool, **overrides)


def submit_answers(writer: RedisWriter, count: int, per_request: int,
                   tag: str = "r") -> list[asyncio.Future[Any]]:
    """Like submit_requests, but each future gets (error, spooled)."""
    loop = asyncio.get_running_loop()
    futures = []
    for r in range(count):
        fut: asyncio.Future[Any] = loop.create_future()
        records = [b"%s%d-e%d" % (tag.encode(), r, e) for e in range(per_request)]
        writer.submit(records, sum(map(len, records)),
                      lambda err, spooled, f=fut: f.set_result((err, spooled)))
        futures.append(fut)
    return futures


async def answered(futures: list[asyncio.Future[Any]], timeout: float = 5) -> list[Any]:
    """The answers, or a failure (not a hang) when some request is never answered."""
    return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))


async def wait_for(check: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_redis_down_spools_then_replays_in_order(redis_server: RedisServer, redis: redislib.Redis,
                                                 tmp_path: Path) -> None:
    async def scenario() -> None:
        writer = make_spooling_writer(redis_server.url, tmp_path)
        await writer.start()
        redis_server.stop()
        # the first request finds the connection broken and goes to the spool after all
        assert await asyncio.gather(*submit_answers(writer, 1, 2, "a")) == [(None, True)]
        assert not writer.ready and writer.refusal is None  # the spool takes events
        assert await asyncio.gather(*submit_answers(writer, 20, 2, "b")) == [(None, True)] * 20
        assert writer.events_spooled == 42
        redis_server.start()
        await wait_for(lambda: writer.events_replayed == 42, 10)
        assert writer.spool is not None and writer.spool.backlog == 0
        await writer.close()

    asyncio.run(scenario())
    expected = [b"a0-e0", b"a0-e1"] + [b"b%d-e%d" % (r, e) for r in range(20) for e in range(2)]
    assert redis_server.client.lrange(QUEUE, 0, -1) == expected
    assert list(tmp_path.iterdir()) == []  # an empty spool is removed at close


def test_a_write_past_the_deadline_is_answered_from_the_spool(redis_server: RedisServer,
                                                              redis: redislib.Redis, tmp_path: Path) -> None:
    async def scenario() -> None:
        writer = make_spooling_writer(redis_server.url, tmp_path, deadline=0.2)
        await writer.start()
        redis.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        started = time.monotonic()
        answers = await asyncio.gather(*submit_answers(writer, 5, 1))
        assert answers == [(None, True)] * 5
        assert time.monotonic() - started < 0.9  # not held until the pause ends
        assert writer.slow
        assert await asyncio.gather(*submit_answers(writer, 1, 1, "later")) == [(None, True)]
        await wait_for(lambda: not writer.slow and writer.events_replayed == 6, 10)
        await writer.close()

    asyncio.run(scenario())
    values = redis.lrange(QUEUE, 0, -1)
    # the late RPUSH landed too: at-least-once, every record at least once
    assert set(values) == {b"r%d-e0" % r for r in range(5)} | {b"later0-e0"}


def test_queue_length_cap_refuses_until_the_queue_drains(redis_server: RedisServer, redis: redislib.Redis,
                                                         tmp_path: Path) -> None:
    async def scenario() -> None:
        writer = make_spooling_writer(redis_server.url, tmp_path, max_queue_length=5)
        await writer.start()
        assert await asyncio.gather(*submit_answers(writer, 1, 6)) == [(None, False)]
        assert writer.queue_full and writer.refusal is not None
        with pytest.raises(WriterUnavailable, match="max_queue_length"):
            writer.submit([b"x"], 1, lambda err, spooled: None)
        redis.ltrim(QUEUE, 1, 0)
        await wait_for(lambda: not writer.queue_full, 5)  # the heartbeat's LLEN
        assert await asyncio.gather(*submit_answers(writer, 1, 1)) == [(None, False)]
        await writer.close()

    asyncio.run(scenario())


def test_drain_spools_what_is_still_in_memory_at_the_deadline(redis_server: RedisServer,
                                                              redis: redislib.Redis, tmp_path: Path) -> None:
    async def scenario() -> None:
        writer = make_spooling_writer(redis_server.url, tmp_path, deadline=30)
        await writer.start()
        redis.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        futures = submit_answers(writer, 10, 1)
        assert await writer.drain(0.3)
        assert [f.result() for f in futures] == [(None, True)] * 10
        await writer.close()

    asyncio.run(scenario())
    wait_until(lambda: redis.ping(), 5, "the pause to end")
    [left] = list(tmp_path.glob("*.spool"))  # kept for a successor (and the late RPUSH landed too)
    orphan = SpoolFile.adopt(str(left))
    assert orphan is not None and len(orphan.read(100, 1 << 20).records) == 10
    orphan.close()


def test_orphan_spools_are_replayed_and_removed(redis_server: RedisServer, redis: redislib.Redis,
                                                tmp_path: Path) -> None:
    dead = SpoolFile.create(str(tmp_path), durable=False)
    dead.append([encode_frame([b"orphan-%d" % i for i in range(3)]), encode_frame([b"orphan-3"])], "never")
    dead.close()  # its process is gone: the lock with it

    async def scenario() -> None:
        writer = make_spooling_writer(redis_server.url, tmp_path)
        await writer.start()  # looks for what predecessors left
        await wait_for(lambda: writer.events_replayed == 4 and not writer.replaying, 5)
        await writer.close()

    asyncio.run(scenario())
    assert redis.lrange(QUEUE, 0, -1) == [b"orphan-%d" % i for i in range(4)]
    assert not os.path.exists(dead.path)


@pytest.mark.parametrize("fault", ["advance", "remove"])
def test_an_orphan_whose_replay_fails_is_released(redis_server: RedisServer, redis: redislib.Redis,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  fault: str) -> None:
    """A failure while replaying an adopted spool must give its lock back: held on, it
    would keep every worker from adopting the file until this one exits."""
    dead = SpoolFile.create(str(tmp_path), durable=False)
    dead.append([encode_frame([b"orphan-%d" % i]) for i in range(3)], "never")
    dead.close()
    failures = [OSError(errno.ENOSPC, "No space left on device")]
    if fault == "advance":
        real_advance = SpoolFile.advance

        def failing_advance(self: SpoolFile, end: int, shift: int | None = None) -> int:
            if not self.owned and failures:
                raise failures.pop()
            return real_advance(self, end, shift)

        monkeypatch.setattr(SpoolFile, "advance", failing_advance)
    else:
        real_unlink = os.unlink

        def failing_unlink(path: str) -> None:
            if path == dead.path and failures:
                raise failures.pop()
            real_unlink(path)

        monkeypatch.setattr(os, "unlink", failing_unlink)

    async def scenario() -> None:
        writer = make_spooling_writer(redis_server.url, tmp_path)
        await writer.start()  # adopts the orphan; its replay fails once
        await wait_for(lambda: not failures and not writer.replaying, 5)
        assert os.path.exists(dead.path)
        other = SpoolFile.adopt(dead.path)  # another worker can take it over now
        assert other is not None
        other.close()
        writer.check_spools()  # the next tick: replayed (again, at worst) and removed
        await wait_for(lambda: not os.path.exists(dead.path) and not writer.replaying, 5)
        await writer.close()

    asyncio.run(scenario())
    assert set(redis.lrange(QUEUE, 0, -1)) == {b"orphan-%d" % i for i in range(3)}


def test_an_unexpected_error_in_a_write_leaves_no_spooling_state_behind(
        redis_server: RedisServer, redis: redislib.Redis, tmp_path: Path) -> None:
    """A bug in the write path (here: after the RPUSH reply) must neither strand the
    requests of the batch nor leave the writer spooling for good."""
    async def scenario() -> None:
        writer = make_spooling_writer(redis_server.url, tmp_path, deadline=0.2)
        await writer.start()
        real_saw = writer._saw_queue_length
        bugs = [RuntimeError("bug")]

        def buggy_saw(length: object) -> None:
            if bugs:
                raise bugs.pop()
            real_saw(length)

        writer._saw_queue_length = buggy_saw  # type: ignore[method-assign]
        # before the deadline: answered (from the spool), and no deadline timer left to fire
        assert await answered(submit_answers(writer, 1, 1, "a")) == [(None, True)]
        await asyncio.sleep(3 * writer.deadline)
        assert not writer.slow
        # past the deadline: the slow RPUSH ends in the bug, spooling ends with it
        bugs.append(RuntimeError("bug"))
        redis.execute_command("CLIENT", "PAUSE", 600, "ALL")
        assert await answered(submit_answers(writer, 1, 1, "b")) == [(None, True)]
        assert writer.slow
        await wait_for(lambda: not writer.slow, 5)
        assert await answered(submit_answers(writer, 1, 1, "c")) == [(None, False)]
        await writer.close()

    asyncio.run(scenario())


# --- redis.wait_replicas: WAIT on the RPUSH's own connection


def test_wait_replicas_short_spools_too_and_a_replica_that_comes_lets_the_replay_go(
        redis_server: RedisServer, redis: redislib.Redis, tmp_path: Path) -> None:
    """No replica: WAIT 1 falls short, so each request is in Redis and answered from the
    spool (duplicates, never losses) and replays wait. A replica that links up is seen by
    the tick's WAIT probe (no request needs to come), and the spool goes to Redis."""
    replica_port = free_port()
    (tmp_path / "replica").mkdir()
    (tmp_path / "spool").mkdir()
    replica: subprocess.Popen[bytes] | None = None

    async def scenario() -> None:
        nonlocal replica
        writer = make_spooling_writer(redis_server.url, tmp_path / "spool", wait_replicas=1, timeout=0.5,
                                      deadline=3.0)
        await writer.start()
        assert await answered(submit_answers(writer, 3, 2)) == [(None, True)] * 3
        assert writer.replicas_short and writer.waits_short >= 1
        assert redis.llen(QUEUE) == 6  # in Redis already, and in the spool
        writer.check_spools()  # a tick: the probe still finds no replica, nothing replays
        await wait_for(lambda: not writer.replaying, 5)
        assert writer.replicas_short and writer.events_replayed == 0
        replica = subprocess.Popen(["redis-server", "--port", str(replica_port), "--bind", "127.0.0.1",
                                    "--save", "", "--replicaof", "127.0.0.1", str(redis_server.port),
                                    "--dir", str(tmp_path / "replica")],
                                   stdout=subprocess.DEVNULL, start_new_session=True)
        await wait_for(lambda: redis.info("replication").get("connected_slaves") == 1, 20)

        async def ticks() -> None:
            while writer.events_replayed < 6:
                writer.check_spools()
                await asyncio.sleep(0.1)
        await asyncio.wait_for(ticks(), 20)
        assert not writer.replicas_short
        assert await answered(submit_answers(writer, 1, 1, "met")) == [(None, False)]  # WAIT met: from Redis
        await writer.close()

    try:
        asyncio.run(scenario())
    finally:
        if replica is not None:
            kill_group(replica)
    values = redis.lrange(QUEUE, 0, -1)
    # the first copies, then the spool's (more than one if a replay's own WAIT fell short and
    # it was tried again: duplicates, never losses), then the request that WAIT confirmed
    first = [b"r%d-e%d" % (r, e) for r in range(3) for e in range(2)]
    assert sorted(values[:6]) == sorted(first) and values[-1] == b"met0-e0"
    assert all(values[6:-1].count(v) >= 1 for v in first) and set(values[6:-1]) == set(first)


def test_a_wait_whose_replies_do_not_come_in_time_drops_the_connection(
        redis_server: RedisServer, redis: redislib.Redis) -> None:
    """RPUSH + WAIT with Redis holding writes past the exchange's limit: the request gets an
    error and the connection is closed, so the late replies cannot answer the next write
    (redis-py answers a read timeout it was given with None and keeps the connection: the
    writer then read every reply one command late)."""
    async def scenario() -> None:
        writer = make_writer(redis_server.url, wait_replicas=1, timeout=0.3)  # no replica: WAIT says 0
        await writer.start()
        redis.execute_command("CLIENT", "PAUSE", 2500, "WRITE")
        paused_until = time.monotonic() + 2.5
        [(error, spooled)] = await answered(submit_answers(writer, 1, 1, "held"))
        assert error is not None and not spooled
        assert time.monotonic() < paused_until  # given up on at the limit, not when Redis woke
        await asyncio.sleep(paused_until - time.monotonic() + 0.5)  # Redis runs what it held
        await wait_for(lambda: writer.ready, 5)
        await answered(submit_answers(writer, 1, 1, "after"))  # WAIT falls short: an error too
        assert writer.queue_length == redis.llen(QUEUE)  # the RPUSH reply read is this write's own
        await writer.close()

    asyncio.run(scenario())
