"""systemd integration without libsystemd: the notify protocol, socket activation and the
watchdog, in the master only.

Owns: reading (and removing from the environment, so that no child of the master, a
worker or the embedded redis-server, speaks for it) NOTIFY_SOCKET, LISTEN_FDS /
LISTEN_PID / LISTEN_FDNAMES and WATCHDOG_USEC / WATCHDOG_PID; sending notify datagrams;
turning inherited listening fds into sockets; and the heartbeat that proves health
before it sends WATCHDOG=1 and reports STATUS=.
Must not touch: binding sockets (sock.py), processes, or deciding that the service is
ready (the master knows when every worker serves and calls `Notifier.ready`).

The notify protocol (sd_notify(3)): one datagram of `KEY=VALUE` lines to the AF_UNIX
SOCK_DGRAM address in NOTIFY_SOCKET; a leading '@' names an abstract socket. Every
method is a no-op when NOTIFY_SOCKET is unset, and a failed send is logged, never raised:
systemd going away must not take the service down. The socket is non-blocking (the
master's loop must not stall on a busy systemd): a state change (READY=1, RELOADING=1,
STOPPING=1) that finds systemd's queue full (EAGAIN) is kept and sent again, in order,
before anything else, at the master's next loop turn (`Heartbeat.tick` calls `flush`):
a lost READY=1 would leave the unit "activating" or "reloading" until its timeout.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import deque
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

import msgpack

from ..errors import MeteoritError

if TYPE_CHECKING:
    from ..bus.ipc import Bus
    from ..bus.waiters import Waiter

log = logging.getLogger("meteorit.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first fd systemd passes
STATUS_PERIOD = 5.0  # seconds between two STATUS= updates when no watchdog asks for more
BEATS_PER_WATCHDOG = 4  # health is probed (and WATCHDOG=1 sent) 4 times per WATCHDOG_USEC
RETRY_DELAY = 0.1  # seconds between two tries of a state change systemd had no room for
MAX_PENDING = 16  # state changes kept for systemd at most (a reload queues 2); older ones go
STATE_CHANGES = ("READY=1", "RELOADING=1", "STOPPING=1")
TRANSIENT = (errno.EAGAIN, errno.ENOBUFS)  # systemd is busy, not gone: worth another try


class Notifier:
    """sd_notify for one process: READY=1, RELOADING=1, STOPPING=1, STATUS=, WATCHDOG=1."""

    def __init__(self, address: str | None) -> None:
        self.address = _socket_address(address) if address else None
        self._sock: socket.socket | None = None
        self._warned = False
        self._last_error: int | None = None  # errno of the last failed send
        self.last_status = ""  # the STATUS= systemd shows now
        self.pending: deque[tuple[str, ...]] = deque(maxlen=MAX_PENDING)  # state changes not sent yet

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.pop("NOTIFY_SOCKET", None) or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str | None = None) -> bool:
        """Serving (at start, or again after a reload). MAINPID: the pid systemd must
        watch is ours, even when a wrapper (sh -c '... exec') started us. False: not
        delivered now (kept for `flush` when systemd was only busy)."""
        return self.send("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """A reload starts; READY=1 must follow when it is done, whatever its outcome."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def send(self, *lines: str) -> bool:
        """True when systemd got the message now. A state change that found systemd busy
        is kept for `flush`; one sent while others wait goes after them."""
        if self.address is None:
            return False
        if self.flush() and self._send_now(lines):
            return True
        if lines[0] in STATE_CHANGES and (self.pending or self._last_error in TRANSIENT):
            self.pending.append(lines)
            self._note_status(lines)  # it will be delivered: STATUS= need not repeat it
        return False

    def flush(self) -> bool:
        """Send the state changes systemd had no room for, oldest first; True once none wait."""
        while self.pending:
            if not self._send_now(self.pending[0]):
                if self._last_error not in TRANSIENT:
                    self.pending.clear()  # systemd is gone, not busy: nobody to tell
                return False
            self.pending.popleft()
        return True

    def _send_now(self, lines: tuple[str, ...]) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never stall the master's loop on systemd
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            self._last_error = exc.errno
            # once at warning, then at debug: a vanished notify socket must not flood the log
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "systemd notify failed: %s", exc.strerror or exc, extra={"notify": lines[0]})
            return False
        self._last_error = None
        self._note_status(lines)
        return True

    def _note_status(self, lines: tuple[str, ...]) -> None:
        self.last_status = next((line[7:] for line in lines if line.startswith("STATUS=")), self.last_status)

    def fds(self) -> list[int]:
        """What a child of the master must close: the notify socket (it would speak for us)."""
        return [self._sock.fileno()] if self._sock is not None else []

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # abstract namespace
    if not address.startswith("/"):
        raise MeteoritError(f"NOTIFY_SOCKET={address!r}: not a path or an @abstract name")
    return address


# --- socket activation


def listen_sockets(env: MutableMapping[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """The listening sockets systemd passed (fd 3 and up), as (name, socket); [] when none
    were passed to this process. The variables are removed either way: they describe fds
    of this process only and must not reach its children."""
    env = os.environ if env is None else env
    pid, count, names = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None), env.pop("LISTEN_FDNAMES", None)
    if not count or not pid:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        log.warning("LISTEN_FDS is meant for pid %s, not for us: binding server.listen instead", pid)
        return []
    if not count.isdigit() or int(count) < 1:
        raise MeteoritError(f"LISTEN_FDS={count!r}: not a positive number of sockets")
    labels = names.split(":") if names else []
    sockets: list[tuple[str, socket.socket]] = []
    try:
        for index, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))):
            label = labels[index] if index < len(labels) and labels[index] else f"fd{fd}"
            sockets.append((label, _listening_socket(fd, label)))
    except MeteoritError:
        for _label, sock in sockets:
            sock.close()
        raise
    return sockets


def _listening_socket(fd: int, label: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)  # family and type read from the fd
    except OSError as exc:
        raise MeteoritError(f"socket activation: fd {fd} ({label}) is not a socket: {exc.strerror}") from None
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) \
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise MeteoritError(f"socket activation: fd {fd} ({label}) is not a listening stream socket "
                            "(use ListenStream= in the .socket unit)")
    sock.set_inheritable(False)  # the workers get it by fork; redis-server must not by exec
    sock.setblocking(False)
    return sock


# --- the watchdog


def watchdog_interval(env: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds within which systemd wants WATCHDOG=1 (WatchdogSec=), or None."""
    env = os.environ if env is None else env
    usec, pid = env.pop("WATCHDOG_USEC", None), env.pop("WATCHDOG_PID", None)
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6


class Heartbeat:
    """Proves health before it tells systemd: every beat asks each ready worker for its
    counters over the IPC bus, and WATCHDOG=1 goes out only when the master's loop turns
    (the beat runs in it) and every worker answered the previous ask. A wedged worker
    (stuck loop, SIGSTOP) stops the pings, and systemd restarts the service after
    WatchdogSec=. The answers also give STATUS= its throughput."""

    def __init__(self, notifier: Notifier, watchdog: float | None, alert: str) -> None:
        self.notifier = notifier
        self.watchdog = watchdog
        self.alert = alert  # the worker alert that replies with counters (msgpack)
        self.period = min(STATUS_PERIOD, watchdog / BEATS_PER_WATCHDOG) if watchdog else STATUS_PERIOD
        self.next_beat = 0.0
        self.asked: tuple[int, Waiter | None] | None = None  # alert id and its replies; None: not sent
        self.last: tuple[dict[int, tuple[int, int]], float] | None = None  # counters per pid, when

    def timeout(self, now: float) -> float:
        """Seconds until the next beat, or the next try of a state change systemd has not
        had (the master's select waits no longer)."""
        if not self.notifier.enabled:
            return float("inf")
        return min(max(0.0, self.next_beat - now), RETRY_DELAY if self.notifier.pending else float("inf"))

    def tick(self, now: float, bus: Bus, ready_pids: set[int], wanted: int) -> None:
        """Called at every turn of the master's loop."""
        if not self.notifier.enabled:
            return
        self.notifier.flush()
        if now < self.next_beat:
            return
        self.next_beat = now + self.period
        silent, counters = self._collect(bus)
        if not silent and self.watchdog:
            self.notifier.watchdog()
        self._report(now, counters, len(ready_pids), wanted, silent)
        self._ask(bus, ready_pids)

    def _collect(self, bus: Bus) -> tuple[int, dict[int, tuple[int, int]]]:
        """How many workers did not answer the last ask, and the (requests, events)
        counters of those that did."""
        if self.asked is None:
            return 0, {}  # nothing asked yet: the loop turning is all we know
        (alert_id, waiter), self.asked = self.asked, None
        if waiter is None:
            return 1, {}
        bus.forget_waiter(alert_id)
        counters = {pid: _throughput_counters(data) for pid, data in waiter.replies.items()}
        # not waiter.missing: it counts the workers that exited since the ask (waiter.left)
        # as silent, and a worker that is gone does not make the service unhealthy
        return len(waiter.expected - waiter.replies.keys()), counters

    def _ask(self, bus: Bus, ready_pids: set[int]) -> None:
        try:
            alert_id = bus.broadcast(self.alert)
        except MeteoritError as exc:  # a full queue: a worker that stopped reading
            log.warning("health probe not sent: %s", exc)
            self.asked = (0, None)
            return
        self.asked = (alert_id, bus.expect(alert_id, ready_pids))

    def _report(self, now: float, counters: dict[int, tuple[int, int]], ready: int, wanted: int,
                silent: int) -> None:
        text = f"{ready}/{wanted} workers serving"
        if silent:
            text += f", {silent} not answering"
        elif counters and self.last is not None:
            before, then = self.last
            common = counters.keys() & before.keys()  # a respawned worker starts from 0
            if common and now > then:
                requests = sum(max(0, counters[p][0] - before[p][0]) for p in common)
                events = sum(max(0, counters[p][1] - before[p][1]) for p in common)
                text += f", {requests / (now - then):.1f} req/s, {events / (now - then):.1f} events/s"
        if counters:
            self.last = (counters, now)
        if text != self.notifier.last_status:
            self.notifier.status(text)


def _throughput_counters(data: bytes) -> tuple[int, int]:
    try:
        snap = msgpack.unpackb(data)
        return sum(snap.get("requests", {}).values()), int(snap.get("events_accepted", 0))
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException):
        return 0, 0
