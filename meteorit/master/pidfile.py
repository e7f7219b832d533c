"""The master's pid file (`server.pid_file`), for init scripts and monitoring that want one.

Owns: the pid file and the lock on it. The master holds an exclusive flock(2) on the file
for its whole life; the lock, not the pid written in it, says whether a meteorit runs
(a pid is recycled after a crash or a reboot, a lock dies with its holder). The fd is
O_CLOEXEC, so the embedded redis-server (exec'd) never holds it, and the master closes it
in every worker it forks (`fd`), so a worker that outlives a killed master does not keep
the next one from starting. The pid goes in whole: a new file with the pid in it, locked,
then renamed over the path. At exit the file is removed while it is still ours.
Must not touch: anything else; under systemd (Type=notify) no pid file is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

from ..errors import MeteoritError

TAKE_ATTEMPTS = 5  # each lost only to another start racing us for the same path


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.pid: int | None = None
        self.fd: int | None = None  # the locked file, open while the master lives

    def create(self, pid: int) -> None:
        """Lock the path and write `pid` in it; MeteoritError if a live meteorit holds it."""
        for _attempt in range(TAKE_ATTEMPTS):
            claim = self._claim_path()
            if claim is None:
                continue  # the file was replaced or removed as we locked it: look again
            try:
                self.fd = self._write_locked(pid)
            finally:
                os.close(claim)  # the old file's lock: the new one (renamed over it) holds
            self.pid = pid
            return
        raise MeteoritError(f"{self.path}: pid file keeps changing under us; is another meteorit starting?")

    def _claim_path(self) -> int | None:
        """The file now at the path, opened and locked; None if it changed meanwhile."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise MeteoritError(f"cannot write the pid file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_pid(fd)
            os.close(fd)
            holder = f"with pid {other}" if other is not None else "(it holds the lock)"
            raise MeteoritError(f"{self.path}: meteorit already runs {holder}") from None
        if not _is_at(fd, self.path):
            os.close(fd)
            return None
        return fd

    def _write_locked(self, pid: int) -> int:
        directory = os.path.dirname(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".meteorit-pid-", dir=directory)  # O_CLOEXEC, O_EXCL
        except OSError as exc:
            raise MeteoritError(f"cannot write the pid file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else knows this file yet: at once
            os.write(fd, f"{pid}\n".encode())
            os.fchmod(fd, 0o644)
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise MeteoritError(f"cannot write the pid file {self.path}: {exc.strerror}") from None
        return fd

    def read(self) -> int | None:
        """The pid written in the file (whether or not it runs); None without a file."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MeteoritError(f"cannot read the pid file {self.path}: {exc.strerror}") from None
        try:
            return _read_pid(fd)
        finally:
            os.close(fd)

    def remove(self) -> None:
        """At exit: unlink the file if it is still the one we locked, then let the lock go."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # exiting anyway: an unlocked file is stale to the next start
            if _is_at(self.fd, self.path):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = self.pid = None


def _is_at(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None  # garbage or empty: no pid to name
