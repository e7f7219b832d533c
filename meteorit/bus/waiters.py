"""Replies awaited on the bus: what request(), gather() and the master's expect() wait for.

Owns: which pids are expected, the replies in, the ones that left the bus, and calling back
once complete. Must not touch: pipes or packets (meteorit.bus.ipc delivers the replies).
"""

from __future__ import annotations

import asyncio
from typing import Callable


class Waiter:
    """Replies awaited by request(), gather() or, in the master, expect()."""

    def __init__(self, expected: set[int],
                 on_complete: Callable[[dict[int, bytes]], None] | None = None) -> None:
        self.expected = expected
        self.on_complete = on_complete
        self.replies: dict[int, bytes] = {}
        self.left: set[int] = set()  # expected, but left the bus before replying
        self._check()  # nobody to wait for: done at once

    @property
    def complete(self) -> bool:
        return self.expected <= self.replies.keys()

    @property
    def missing(self) -> list[int]:
        return sorted((self.expected - self.replies.keys()) | self.left)

    def add(self, pid: int, data: bytes) -> None:
        if pid in self.expected and pid not in self.replies:
            self.replies[pid] = data
            self._check()

    def forget(self, pid: int) -> None:
        if pid in self.expected and pid not in self.replies:
            self.left.add(pid)
        self.expected.discard(pid)
        self._check()

    def _check(self) -> None:
        if self.on_complete is not None and self.complete:
            done, self.on_complete = self.on_complete, None
            done(self.replies)


def resolver(future: asyncio.Future[dict[int, bytes]]) -> Callable[[dict[int, bytes]], None]:
    def resolve(replies: dict[int, bytes]) -> None:
        if not future.done():
            future.set_result(replies)
    return resolve
