"""The embedded Redis: a private redis-server the master starts and supervises when
`redis.url = "embedded"`, so a fresh machine needs no Redis set-up of its own.

Owns: the data directory (`redis.data_dir`: redis.conf, appendonly AOF files, redis.sock,
redis.log, redis.pid, meteorit.lock), starting redis-server in its own session (a Ctrl-C or a group
signal reaches only the master, which stops Redis last, after the workers flushed) and
stopping it. Must not touch: the queue's contents.

Started by a root master with `server.user`, the data directory and redis-server are the
user's: the master writes there only through new files renamed into place (redis.conf)
and O_NOFOLLOW opens (meteorit.lock), and talks only to a redis.sock served by the user's
uid, so nothing the user plants there leads root elsewhere.

Durability: AOF with `appendfsync everysec`, Redis's default trade-off; point `redis.url`
at a Redis of your own for anything else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import privileges
from ..config import EMBEDDED_SOCKET
from ..errors import EmbeddedRedisError
from ..privileges import Identity

log = logging.getLogger("meteorit.embedded")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0

CONF = """# written by meteorit at every start: edit redis.data_dir / redis.url instead
port 0
unixsocket {socket}
unixsocketperm 700
dir {dir}
appendonly yes
appendfsync everysec
save ""
daemonize no
logfile {dir}/redis.log
pidfile {dir}/redis.pid
"""


class EmbeddedRedis:
    def __init__(self, data_dir: str, binary: str = "redis-server", owner: Identity | None = None) -> None:
        self.dir = os.path.abspath(data_dir)
        self.binary = binary
        self.owner = owner  # server.user: redis-server runs as it, and owns the data directory
        self.socket_path = os.path.join(self.dir, EMBEDDED_SOCKET)
        self.pid: int | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def fds(self) -> list[int]:
        """What a child of the master must close: the data directory's lock, which a
        worker outliving the master would hold against the next start."""
        return [self._lock_fd] if self._lock_fd is not None else []

    def start(self) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise EmbeddedRedisError(
                f"redis.url is \"embedded\" but {self.binary!r} is not installed "
                "(apt-get install redis-server), or set redis.url to your Redis")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        # first: refuses a data directory that is a symlink or someone else's, before we
        # (root, with server.user) create anything in it
        privileges.give(self.owner, self.dir, recursive=True)
        self._take_lock()
        self._stop_orphan()
        conf = self._write_conf()
        self.pid = privileges.spawn([binary, conf], dict(os.environ), self.owner)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self._loading():
                deadline = time.monotonic() + START_TIMEOUT  # a big AOF takes its time to load
            if self.poll_exited() or time.monotonic() > deadline:
                self.stop()
                raise EmbeddedRedisError(f"redis-server did not start: see {self.dir}/redis.log")
            time.sleep(0.05)
        log.info("embedded redis started", extra={"redis_pid": self.pid, "data_dir": self.dir})

    def stop(self) -> None:
        """SIGTERM (Redis writes its AOF and exits), SIGKILL past STOP_TIMEOUT."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                log.info("embedded redis stopped")
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        log.error("embedded redis did not stop in %ss; killed", STOP_TIMEOUT)

    def poll_exited(self) -> bool:
        if self.pid is None:
            return True
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            done = self.pid
        if done:
            self.pid = None
        return bool(done)

    def reaped(self) -> None:
        """The master's reaper collected redis-server's exit status."""
        self.pid = None

    def _write_conf(self) -> str:
        """redis.conf as a new file renamed over the old name: whatever the user's redis-server
        left under that name (a symlink to a file of root's, a hard link) is replaced, never
        written through."""
        conf = os.path.join(self.dir, "redis.conf")
        fd, tmp = tempfile.mkstemp(prefix=".redis.conf.", dir=self.dir)  # O_EXCL: a new file
        try:
            with os.fdopen(fd, "w") as f:
                f.write(CONF.format(socket=self.socket_path, dir=self.dir))
            os.replace(tmp, conf)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise EmbeddedRedisError(f"cannot write {conf}: {exc.strerror}") from None
        privileges.give(self.owner, conf)  # redis-server, as the user, reads it
        return conf

    def _take_lock(self) -> None:
        if self._lock_fd is not None:
            return
        path = os.path.join(self.dir, "meteorit.lock")
        try:  # O_NOFOLLOW: the directory is the user's, a symlink there is not ours to open
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            reason = "a symbolic link, not followed" if exc.errno == errno.ELOOP else exc.strerror
            raise EmbeddedRedisError(f"cannot open {path}: {reason}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedRedisError(f"another meteorit uses {self.dir}; pick another redis.data_dir") from None
        self._lock_fd = fd

    def _client(self, timeout: float = 1.0) -> redis.Redis:
        server_uid = self.owner.uid if self.owner is not None and privileges.switching(self.owner) else os.geteuid()
        pool = redis.ConnectionPool(connection_class=_OwnSocketConnection, path=self.socket_path,
                                    socket_timeout=timeout, server_uid=server_uid,
                                    retry=Retry(NoBackoff(), 0))  # one try: the caller polls
        return redis.Redis.from_pool(pool)  # closes the pool with the client

    def _answers(self) -> bool:
        try:
            return bool(self._client().ping())
        except (redis.RedisError, OSError):
            return False

    def _loading(self) -> bool:
        """Up, but still loading its AOF (PING answers LOADING)."""
        try:
            self._client().ping()
        except redis.BusyLoadingError:
            return True
        except (redis.RedisError, OSError):
            pass
        return False

    def _stop_orphan(self) -> None:
        """A redis-server left by a master that was killed: we hold the lock, so it is ours."""
        if not self._answers():
            return
        log.warning("stopping an embedded redis left by a previous run")
        try:
            self._client(STOP_TIMEOUT).shutdown()
        except (redis.RedisError, OSError):
            pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._answers() and time.monotonic() < deadline:
            time.sleep(0.05)


class _OwnSocketConnection(redis.UnixDomainSocketConnection):
    """A connection to our redis-server only: the socket's peer must run as the uid we
    started it as. redis.sock sits in the user's directory, where the user can put a
    symlink to another server's socket (the system's Redis): a root master would
    otherwise ping it, or send it SHUTDOWN as an orphan of ours. The check is on the
    connected socket itself (SO_PEERCRED), so nothing can be swapped after it."""

    def __init__(self, server_uid: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_uid = server_uid

    def _connect(self) -> socket.socket:
        sock = super()._connect()
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        if uid != self.server_uid:
            sock.close()
            raise redis.ConnectionError(f"{self.path} is served by uid {uid}, not by our redis-server "
                                        f"(uid {self.server_uid}): not talking to it")
        return sock
