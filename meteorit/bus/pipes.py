"""The pipes of the IPC bus: one per slot (each worker slot and the master), made by the
master before fork, so every process can write to every pipe and reads only its own.

Owns: making the pipes (non-blocking, close-on-exec, as large as the kernel allows up to
PIPE_SIZE) and closing the read ends a worker must not hold. Must not touch: what goes
through them (meteorit.bus.ipc queues and writes, meteorit.bus.wire frames).
"""

from __future__ import annotations

import fcntl
import os

MASTER_SLOT = -1
PIPE_SIZE = 1024 * 1024  # asked of the kernel per pipe (F_SETPIPE_SZ), to absorb bursts
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Pipes:
    """One non-blocking pipe per slot (workers 0..n-1 and the master), made before fork."""

    def __init__(self, slots: int) -> None:
        self.fds: dict[int, tuple[int, int]] = {}
        for slot in [MASTER_SLOT, *range(slots)]:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # kept over fork, not over exec
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # over /proc/sys/fs/pipe-max-size: the default size works too
            self.fds[slot] = (r, w)

    def keep_only_reader(self, slot: int) -> None:
        """In a worker: close the read ends of the other slots' pipes."""
        for other, (r, _w) in self.fds.items():
            if other != slot:
                os.close(r)

    def all_fds(self) -> list[int]:
        return [fd for pair in self.fds.values() for fd in pair]
