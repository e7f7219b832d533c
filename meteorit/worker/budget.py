"""The worker's budget of buffered request bodies (`limits.max_buffered_bytes`).

Owns: the count of the bytes of request bodies that are still arriving, held in memory
over every connection of one worker before the app sees them; the admission of a body
that would need more; the connections paused until bytes are released, and waking them.
Must not touch: sockets or parsing: http.py decides what to hold, refuse and pause.

Without it `max_connections x max_body` could be held by slow senders. A body that arrives
whole in the read that completes its headers is never held (it goes to the app in that
read): normal traffic never meets the budget. A body that is still arriving at the end of
a read is admitted or refused (503) once:
- with a Content-Length, it reserves all of it, so an admitted body can always finish and
  these reservations never pass the limit;
- chunked, it has no length: it holds what it has read, and while the total is over the
  limit its connection stops reading until bytes are released. The total may so pass the
  limit by the last read (at most 256 KiB with uvloop) of each chunked connection that was
  reading when it was crossed; the body timeout still ends a body that never completes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Protocol


class Waiter(Protocol):
    def room_made(self) -> None: ...


class BodyBudget:
    __slots__ = ("limits", "held", "refused", "waiting")

    def __init__(self, limits: SimpleNamespace) -> None:
        self.limits = limits  # read at each use: a hot reload changes the limit in place
        self.held = 0  # bytes reserved or read by the bodies being received
        self.refused = 0  # requests answered 503 because their body did not fit
        self.waiting: dict[Waiter, None] = {}  # connections paused for room, in the order they paused

    @property
    def over(self) -> bool:
        return self.held > self.limits.max_buffered_bytes

    def admit(self, size: int) -> bool:
        """Hold `size` bytes more if they fit in the limit; False (and counted) if not."""
        if self.held + size > self.limits.max_buffered_bytes:
            self.refused += 1
            return False
        self.held += size
        return True

    def grow(self, size: int) -> None:
        """A chunked body read `size` bytes more: held whatever the limit (they are in memory)."""
        self.held += size

    def wait(self, waiter: Waiter) -> None:
        self.waiting[waiter] = None

    def forget(self, waiter: Waiter) -> None:
        self.waiting.pop(waiter, None)

    def release(self, size: int) -> None:
        """A body went to the app or was dropped; under the limit again, every paused
        connection reads again (each pauses again if its next read goes over)."""
        self.held -= size
        if self.waiting and not self.over:
            waiting, self.waiting = self.waiting, {}
            for waiter in waiting:
                waiter.room_made()
