"""The Redis writer against a real redis-server: group commit, bounds, Redis going away."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis as redislib

from conftest import RedisServer, free_port
from meteorit.errors import WriterUnavailable
from meteorit.writer import RedisWriter

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
        writer.submit(records, sum(map(len, records)), lambda err, f=fut: f.set_result(err))
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
        writer.submit([b"x" * 60], 60, lambda err: None)
        with pytest.raises(WriterUnavailable, match="too many events"):
            writer.submit([b"y" * 60], 60, lambda err: None)
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
            writer.submit([b"z"], 1, lambda err: None)
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
            writer.submit([b"late"], 4, lambda err: None)
        await writer.close()

    asyncio.run(scenario())
    assert redis.llen(QUEUE) == 100
