"""The bytes the writer sends and how it reads the replies: packed in C by hiredis, read
on a redis-py connection driven directly.

Owns: packing the group-commit RPUSH and WAIT, and reading the replies of pipelined
commands with every reply consumed. Must not touch: connections' life cycle or state.
"""

from __future__ import annotations

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
