"""The bytes the writer sends and how it reads the replies: packed in C by hiredis, read
on a redis-py connection driven directly.

Owns: packing the group-commit RPUSH and WAIT, and one exchange on a connection: the
write and every reply within one deadline, and a connection that failed or ran late closed,
so a late reply never answers the next command. Must not touch: which connection, retries,
the writers' state.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Errors of the transport: Redis may be back later (retry, spool), unlike a command's error.
TRANSPORT_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def pack_wait(replicas: int, timeout: float) -> bytes:
    """WAIT for `replicas` replicas, at most `timeout` seconds (0 would mean for ever)."""
    return hiredis.pack_command((b"WAIT", replicas, max(1, int(timeout * 1000))))


async def exchange(conn: Any, packed: bytes, replies: int, limit: float, peer: str) -> list[Any]:
    """Send `packed` (`replies` pipelined commands) on `conn` and read every reply, an error
    reply as its exception object; connecting, writing and reading all within `limit`
    seconds, or RedisTimeoutError."""
    try:
        async with asyncio.timeout(limit):
            if not conn.is_connected:  # connect(): sentinel mode asks for the primary there
                await conn.connect()
            await conn.send_packed_command(packed, check_health=False)
            return await read_replies(conn, replies)
    except TimeoutError:
        await conn.disconnect()
        raise RedisTimeoutError(f"no reply from {peer} within {limit:g}s") from None
    except BaseException:
        await conn.disconnect()
        raise


async def read_replies(conn: Any, count: int) -> list[Any]:
    """`count` replies of pipelined commands, an error reply as its exception object: every
    reply is read, so the connection stays in step whatever they say. No timeout of its
    own: the caller bounds the whole exchange (redis-py answers a read timeout it was given
    with None, not an error, and leaves the late reply on the connection for the next
    command to read)."""
    answers: list[Any] = []
    for _ in range(count):
        try:
            answers.append(await conn.read_response(timeout=math.inf))
        except ResponseError as exc:
            answers.append(exc)
    return answers


def pack_rpush(queue: bytes, values: list[bytes]) -> bytes:
    """The wire bytes of one group-commit RPUSH, packed in C."""
    return hiredis.pack_command((b"RPUSH", queue, *values))
