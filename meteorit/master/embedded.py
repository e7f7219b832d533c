"""The embedded Redis: a private redis-server the master starts and supervises when
`redis.url = "embedded"`, so a fresh machine needs no Redis set-up of its own.

Owns: the data directory (`redis.data_dir`: redis.conf, appendonly AOF files, redis.sock,
redis.log, redis.pid, meteorit.lock), starting redis-server in its own session (a Ctrl-C or a group
signal reaches only the master, which stops Redis last, after the workers flushed),
restarting it when it dies, and stopping it. Must not touch: the queue's contents.

The first start, before any worker exists, waits until Redis answers. A restart never
waits: the master's loop must keep supervising workers and answering meteoritctl while
Redis starts and loads its AOF (seconds to minutes), and the workers spool meanwhile.
`supervise`, run at every turn of the master's loop, spawns redis-server, then looks for
its answer to one PING over a non-blocking socket at each later turn; a start that fails
(redis-server exits, or neither answers nor loads within START_TIMEOUT) is retried after a
backoff that doubles with each failure in a row, up to RESTART_BACKOFF_MAX.

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
from ..errors import EmbeddedRedisError, MeteoritError
from ..privileges import Identity

log = logging.getLogger("meteorit.embedded")

START_TIMEOUT = 10.0  # seconds to answer PING (or LOADING, which starts the count again)
STOP_TIMEOUT = 30.0
RESTART_BACKOFF_BASE = 0.5  # seconds before the second restart in a row, doubled for each further one
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a Redis that served this long starts the count of failures again
PROBE_INTERVAL = 0.1  # seconds between two looks at a starting Redis from the master's loop

DOWN, STARTING, UP = "down", "starting", "up"

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
        self.state = DOWN
        self.restarts = 0  # starts after the first one
        self.failures = 0  # deaths and failed starts in a row
        self._next_start = 0.0  # monotonic: no restart before
        self._deadline = 0.0  # monotonic: a starting Redis that has not answered by then failed
        self._up_since = 0.0
        self._probe: _Probe | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def fds(self) -> list[int]:
        """What a child of the master must close: the data directory's lock, which a
        worker outliving the master would hold against the next start."""
        return [self._lock_fd] if self._lock_fd is not None else []

    def start(self) -> None:
        """The first start, before the workers: returns once Redis answers PING."""
        self._prepare()
        self._stop_orphan()
        self._spawn()
        while True:
            self.poll_exited()  # nobody else reaps yet
            failure = self._check_start(time.monotonic())
            if self.state == UP:
                return
            if failure is not None:
                self.stop()
                raise EmbeddedRedisError(f"redis-server did not start ({failure}): see {self.dir}/redis.log")
            time.sleep(0.05)

    # --- supervision from the master's loop (never blocks)

    def supervise(self, now: float) -> None:
        """One look, at every turn of the master's loop: restart a dead Redis once its
        backoff is over, see whether a starting one answers yet."""
        if self.state == UP and self.pid is None:
            self._failed(now, "it died")  # the master's reaper logged how
        elif self.state == STARTING:
            failure = self._check_start(now)
            if failure is not None:
                self._failed(now, failure)
        elif self.state == DOWN and self.pid is None and now >= self._next_start:
            self.restarts += 1
            log.warning("restarting embedded redis", extra={"failures": self.failures, "restarts": self.restarts})
            try:
                self._prepare()
                self._spawn()
            except (MeteoritError, OSError) as exc:  # say, a binary that cannot be executed
                self._failed(now, str(exc))

    def wait(self, now: float) -> float:
        """Seconds until `supervise` has something to do (the master's loop sleeps no longer)."""
        if self.state == STARTING:
            return PROBE_INTERVAL
        if self.state == DOWN and self.pid is None:
            return max(0.0, self._next_start - now)
        return 1.0

    def describe(self) -> dict[str, Any]:
        """For `meteoritctl status`."""
        return {"state": self.state, "pid": self.pid, "restarts": self.restarts, "failures": self.failures}

    def _failed(self, now: float, reason: str) -> None:
        if self.state == UP and now - self._up_since >= STABLE_AFTER:
            self.failures = 0  # it served long enough: this is no crash loop
        self.failures += 1
        delay = restart_delay(self.failures)
        self._next_start = now + delay
        self.state = DOWN
        self._close_probe()
        if self.pid is not None:  # started but never answered: killed, the master's reaper collects it
            _kill(self.pid, signal.SIGKILL)
        log.error("embedded redis is down; workers spool until it is back",
                  extra={"reason": reason, "failures": self.failures, "retry_in": delay})

    def _check_start(self, now: float) -> str | None:
        """Whether a starting Redis answers yet (state becomes UP): None while it may still,
        else why it failed."""
        if self.pid is None:
            return "redis-server exited"
        if self._probe is None:
            try:
                self._probe = _Probe(self.socket_path, self._server_uid())
            except OSError:
                pass  # not listening yet
        answer = self._probe.answer() if self._probe is not None else None
        if answer is not None:
            self._close_probe()  # one PING per connection: the next look asks again
        if answer == b"+PONG":
            self.state = UP
            self._up_since = now
            log.info("embedded redis started", extra={"redis_pid": self.pid, "data_dir": self.dir})
            return None
        if answer is not None and answer.startswith(b"-LOADING"):
            self._deadline = now + START_TIMEOUT  # a big AOF takes its time to load
        if now > self._deadline:
            return f"no answer in {START_TIMEOUT:.0f}s"
        return None

    def _close_probe(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def _prepare(self) -> None:
        """The binary, the data directory (ours or the user's) and its lock."""
        if shutil.which(self.binary) is None:
            raise EmbeddedRedisError(
                f"redis.url is \"embedded\" but {self.binary!r} is not installed "
                "(apt-get install redis-server), or set redis.url to your Redis")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        # first: refuses a data directory that is a symlink or someone else's, before we
        # (root, with server.user) create anything in it
        privileges.give(self.owner, self.dir, recursive=True)
        self._take_lock()

    def _spawn(self) -> None:
        binary = shutil.which(self.binary)
        assert binary is not None
        conf = self._write_conf()
        self.pid = privileges.spawn([binary, conf], dict(os.environ), self.owner)
        self.state = STARTING
        self._deadline = time.monotonic() + START_TIMEOUT

    def stop(self) -> None:
        """SIGTERM (Redis writes its AOF and exits), SIGKILL past STOP_TIMEOUT."""
        self._close_probe()
        self.state = DOWN
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

    def _server_uid(self) -> int:
        """The uid our redis-server runs as: redis.sock must be served by it."""
        return self.owner.uid if self.owner is not None and privileges.switching(self.owner) else os.geteuid()

    def _client(self, timeout: float = 1.0) -> redis.Redis:
        pool = redis.ConnectionPool(connection_class=_OwnSocketConnection, path=self.socket_path,
                                    socket_timeout=timeout, server_uid=self._server_uid(),
                                    retry=Retry(NoBackoff(), 0))  # one try: the caller polls
        return redis.Redis.from_pool(pool)  # closes the pool with the client

    def _answers(self) -> bool:
        try:
            return bool(self._client().ping())
        except (redis.RedisError, OSError):
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
        uid = _peer_uid(sock)
        if uid != self.server_uid:
            sock.close()
            raise redis.ConnectionError(f"{self.path} is served by uid {uid}, not by our redis-server "
                                        f"(uid {self.server_uid}): not talking to it")
        return sock


class _Probe:
    """One PING to redis.sock on a non-blocking socket, its answer read at later looks:
    the master's loop never waits for a Redis that is starting. The peer must run as our
    redis-server's uid (see _OwnSocketConnection)."""

    def __init__(self, path: str, server_uid: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)  # a Unix socket connects at once, or refuses (ENOENT, ECONNREFUSED, EAGAIN)
            if _peer_uid(self.sock) != server_uid:
                raise ConnectionRefusedError(f"{path} is not served by our redis-server")
            self.sock.send(b"PING\r\n")  # an inline command: a few bytes, into an empty socket buffer
        except OSError:
            self.sock.close()
            raise
        self.received = b""

    def answer(self) -> bytes | None:
        """The reply's first line once it is in (b"+PONG", b"-LOADING ..."); b"" if Redis
        closed the connection; None while there is nothing yet."""
        try:
            chunk = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""
        if not chunk:
            return b""
        self.received = (self.received + chunk)[:4096]
        line, found, _ = self.received.partition(b"\r\n")
        return line if found else None

    def close(self) -> None:
        self.sock.close()


def restart_delay(failures: int) -> float:
    """Seconds before starting Redis again after `failures` deaths or failed starts in a
    row: at once after the first (a Redis that served and died), then doubling."""
    if failures <= 1:
        return 0.0
    return min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_BASE * 2 ** (failures - 2))


def _peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
