"""The control socket: the master's Unix socket for `meteoritctl`.

Owns: the socket file (created 0600, or 0660 for `[control] group`; a stale one left by a
dead master is replaced, a live one is never stolen), the peer check (SO_PEERCRED: root,
the service's own uid, or a member of the group; anyone else is refused and logged), the
framing and the connections, all non-blocking under the master's selector.
Must not touch: workers, the bus, config: it hands each request to the master's
`handle(connection, request)` and sends back whatever the master answers, now or later.

Framing, both ways: a 4-byte big-endian length, then a msgpack map (or a JSON object, when
the body starts with `{`; the reply uses the same encoding). Requests are
`{"cmd": NAME, ...arguments}`; replies `{"ok": true, ...}` or `{"ok": false, "error": TEXT}`.
A frame over MAX_FRAME, a body that does not decode, or a request that is not a map gets an
error reply; only a frame over the limit also closes the connection (the stream cannot be
resynchronised). Requests on one connection are answered in order.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import pwd
import selectors
import socket
import stat
import struct
import time
from collections import deque
from typing import Any, Callable

import msgpack

from ..errors import MeteoritError
from ..bus.wire import MAX_ALERT

log = logging.getLogger("meteorit.control")

LENGTH = struct.Struct(">I")
MAX_FRAME = MAX_ALERT + 64 * 1024  # room for the largest alert an operator may broadcast
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 60.0  # seconds a connection may sit with a partial frame or no request
REFUSED_LINGER = 2.0  # seconds a refused peer has to read its error before the close
PEERCRED = struct.Struct("3i")  # pid, uid, gid

Request = dict[str, Any]
Reply = dict[str, Any]


class ControlError(MeteoritError):
    pass


def encode(message: Reply, as_json: bool) -> bytes:
    body = json.dumps(message, default=_jsonable).encode() if as_json else msgpack.packb(message)
    return LENGTH.pack(len(body)) + body


def decode(body: bytes) -> tuple[Any, bool]:
    """(message, was JSON); ValueError when it does not decode."""
    try:
        if body[:1] == b"{":
            return json.loads(body), True
        return msgpack.unpackb(body, strict_map_key=False), False
    except Exception as exc:  # msgpack raises several unrelated types; deep nesting, RecursionError
        raise ValueError(f"not msgpack or JSON: {type(exc).__name__}: {exc}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.decode(errors="replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class Connection:
    def __init__(self, server: "ControlServer", sock: socket.socket, uid: int, pid: int) -> None:
        self.server = server
        self.sock = sock
        self.uid = uid
        self.peer_pid = pid
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.requests: deque[tuple[Any, bool]] = deque()
        self.busy = False  # a request is being handled: the next one waits
        self.dispatching = False  # _next_request is running: respond() must not re-enter it
        self.closing = False
        self.closed = False
        self.refused = False  # told why it may not talk to us: what it sends is dropped
        self.eof = False  # the peer shut down its sending side
        self.last_active = time.monotonic()
        self.as_json = False

    def respond(self, reply: Reply) -> None:
        """The answer to the request in hand (any time later: the master may wait for workers)."""
        if self.closed:
            return
        self.outbox += encode(reply, self.as_json)
        self.busy = False
        self.server._flush(self)
        if not self.dispatching:  # a later reply (the master waited): go on with the next request
            self.server._next_request(self)

    def fail(self, error: str) -> None:
        self.respond({"ok": False, "error": error})


class ControlServer:
    def __init__(self, path: str, group: str, selector: selectors.BaseSelector,
                 handle: Callable[[Connection, Request], None]) -> None:
        self.path = path
        self.group = group
        self.gid = _group_id(group) if group else None
        self.selector = selector
        self.handle = handle
        self.sock: socket.socket | None = None
        self.connections: set[Connection] = set()

    # --- the socket file

    def open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # born 0600 (0660 with a group): never a moment where others could connect, and no
        # chmod by path afterwards that a planted symlink could redirect
        old_umask = os.umask(0o117 if self.gid is not None else 0o177)
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise ControlError(f"control.socket: cannot bind {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        if self.gid is not None:
            try:
                os.chown(self.path, -1, self.gid, follow_symlinks=False)
            except OSError as exc:
                sock.close()
                raise ControlError(f"control.group: cannot give {self.path} to group {self.group}: "
                                   f"{exc.strerror}") from None
        sock.listen(16)
        sock.setblocking(False)
        sock.set_inheritable(False)
        self.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, ("control", None))
        log.info("control socket ready", extra={"path": self.path, "group": self.group or None})

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"control.socket: {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlError(f"control.socket: cannot check {self.path}: {exc.strerror}") from None
            os.unlink(self.path)  # nobody listens: a dead master's leftover
            return
        finally:
            probe.close()
        raise ControlError(f"control.socket: {self.path} answers: another meteorit master runs there")

    def close(self) -> None:
        for conn in list(self.connections):
            self._close(conn)
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # --- events from the master's selector

    def on_event(self, conn: Connection | None, events: int) -> None:
        if conn is None:
            self._accept()
            return
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if events & selectors.EVENT_READ and not conn.closed:
            self._read(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle past IDLE_TIMEOUT (a request being handled is not idle)."""
        for conn in list(self.connections):
            idle = now - conn.last_active
            if (conn.refused and idle > REFUSED_LINGER) or (not conn.busy and idle > IDLE_TIMEOUT):
                self._close(conn)

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the master stays up
                log.error("control socket: accept failed: %s", exc.strerror)
                return
            sock.setblocking(False)
            pid, uid, _gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             PEERCRED.size))
            conn = Connection(self, sock, uid, pid)
            if len(self.connections) >= MAX_CONNECTIONS:
                log.warning("control socket: too many connections, refused pid %d", pid)
                sock.close()
                continue
            self.connections.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, ("control", conn))
            if not self._allowed(uid):
                log.warning("control socket: refused uid %d (pid %d)", uid, pid)
                self._refuse(conn, f"permission denied: uid {uid} may not use this control socket")

    def _refuse(self, conn: Connection, error: str) -> None:
        """The reason, then FIN; what the peer still sends is read and dropped until it
        closes (or REFUSED_LINGER): closing with its bytes unread would send a reset that
        can destroy the reason before the peer reads it."""
        conn.refused = True
        try:
            conn.sock.send(encode({"ok": False, "error": error}, False))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)

    def _allowed(self, uid: int) -> bool:
        if uid == 0 or uid == os.geteuid():
            return True
        if self.gid is None:
            return False
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return False
        return self.gid in os.getgrouplist(user.pw_name, user.pw_gid)

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.refused or conn.closing:
                self._close(conn)
                return
            # The peer is done sending (nc -N, socat): answer what it sent, then close.
            conn.closing = conn.eof = True
            self._watch(conn)
            self._next_request(conn)
            return
        if conn.refused:
            return
        conn.last_active = time.monotonic()
        conn.inbox += data
        while len(conn.inbox) >= LENGTH.size and not conn.closing:
            (size,) = LENGTH.unpack_from(conn.inbox)
            if size > MAX_FRAME:
                conn.closing = True
                conn.requests.append((ValueError(f"frame of {size} bytes is over the limit of {MAX_FRAME}"),
                                      conn.inbox[4:5] == b"{"))
                break
            if len(conn.inbox) < LENGTH.size + size:
                break
            body = bytes(conn.inbox[LENGTH.size:LENGTH.size + size])
            del conn.inbox[:LENGTH.size + size]
            try:
                conn.requests.append(decode(body))
            except ValueError as exc:
                conn.requests.append((ValueError(f"cannot decode the request: {exc}"), body[:1] == b"{"))
        self._next_request(conn)

    def _next_request(self, conn: Connection) -> None:
        conn.dispatching = True
        try:
            self._dispatch_requests(conn)
        finally:
            conn.dispatching = False
        if conn.closing and not conn.requests and not conn.busy and not conn.outbox:
            self._close(conn)

    def _dispatch_requests(self, conn: Connection) -> None:
        while conn.requests and not conn.busy and not conn.closed:
            message, as_json = conn.requests.popleft()
            conn.as_json = as_json
            conn.busy = True
            if isinstance(message, ValueError):
                conn.fail(str(message))
            elif not isinstance(message, dict) or not isinstance(message.get("cmd"), str):
                conn.fail("a request is a map with a \"cmd\" string")
            else:
                try:
                    self.handle(conn, message)
                except Exception as exc:  # a bug in one command must not take the master down
                    log.exception("control command %r failed", message.get("cmd"))
                    conn.fail(f"internal error: {exc}")

    def _flush(self, conn: Connection) -> None:
        if conn.closed:
            return
        while conn.outbox:
            try:
                sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            del conn.outbox[:sent]
        self._watch(conn)
        conn.last_active = time.monotonic()
        if conn.closing and not conn.outbox and not conn.busy and not conn.requests:
            self._close(conn)

    def _watch(self, conn: Connection) -> None:
        """Read until the peer's EOF (level-triggered: an EOF left registered would spin),
        write while something waits to be sent."""
        events = (0 if conn.eof else selectors.EVENT_READ) | (selectors.EVENT_WRITE if conn.outbox else 0)
        registered = conn.sock in self.selector.get_map() if events == 0 else None
        try:
            if events:
                self.selector.modify(conn.sock, events, ("control", conn))
            elif registered:
                self.selector.unregister(conn.sock)
        except KeyError:
            self.selector.register(conn.sock, events, ("control", conn))

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.discard(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlError(f"control.group: no group named {group!r}") from None
