"""The master's pid file (`server.pid_file`), for init scripts and monitoring that want one.

Owns: refusing to start over the pid file of a meteorit that still runs, writing the
file atomically (a reader never sees it half written), and removing it at exit only
while it still holds our pid (a successor may have replaced it).
Must not touch: anything else; under systemd (Type=notify) no pid file is needed.
"""

from __future__ import annotations

import os
import tempfile

from .errors import MeteoritError


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.pid: int | None = None

    def create(self, pid: int) -> None:
        other = self.read()
        if other is not None and other != pid and _alive(other):
            raise MeteoritError(f"{self.path}: meteorit already runs with pid {other}")
        directory = os.path.dirname(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".meteorit-pid-", dir=directory)
        except OSError as exc:
            raise MeteoritError(f"cannot write the pid file {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{pid}\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except OSError as exc:
            os.unlink(tmp)
            raise MeteoritError(f"cannot write the pid file {self.path}: {exc.strerror}") from None
        self.pid = pid

    def read(self) -> int | None:
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MeteoritError(f"cannot read the pid file {self.path}: {exc.strerror}") from None
        return int(text) if text.isdigit() else None  # garbage: stale, overwritten

    def remove(self) -> None:
        if self.pid is None:
            return
        try:
            if self.read() == self.pid:
                os.unlink(self.path)
        except (OSError, MeteoritError):
            pass  # exiting anyway: a stale pid file is reported by the next start
        self.pid = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True
