"""The control-socket commands: one `cmd_<name>` per `meteoritctl` command.

Owns: checking each request's arguments (a bad one gets a clear error and changes
nothing), building the replies, and the requests that wait (for the workers' replies to
an alert, or for a scale to settle) until they are answered or their deadline passes.
Must not touch: the socket and its framing (control.py), the worker processes (it asks
the master and slots.py), the reload itself (reload.py), systemd.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import msgpack

from .. import metrics
from ..bus import ipc
from ..bus.ipc import Bus
from ..config import Config
from ..errors import IpcError
from ..worker.process import CONFIG_ALERT, MASTER_STATS_ALERT, RATE_ALERT, READY_ALERT, STATS_ALERT
from .control import Connection
from .reload import Reload
from .slots import BOOT_DEADLINE, KILL_GRACE, Slots

STATS_TIMEOUT = 1.0  # seconds the control socket's status and stats wait for the workers
MAX_WAIT = 300.0  # most seconds a control request may ask to wait for replies
# sent by meteorit's processes to each other with meanings of their own: never from meteoritctl
RESERVED_ALERTS = frozenset({ipc.TABLE_ALERT, READY_ALERT, CONFIG_ALERT, RATE_ALERT, MASTER_STATS_ALERT})
COMMANDS = ("status", "workers", "stats", "reload", "broadcast", "send", "scale", "stop")

Reply = dict[str, Any]
Gathered = Callable[[dict[int, bytes], list[int]], Reply]  # (replies by pid, missing pids) -> reply


@dataclass
class Pending:
    """A control request waiting: `poll` returns the reply once it is ready, else None;
    at the deadline `expire` gives the reply instead."""
    poll: Callable[[], Reply | None]
    expire: Callable[[], Reply]
    deadline: float
    respond: Callable[[Reply], None]
    alert_id: int = 0  # its IPC waiter, forgotten once answered


class Owner(Protocol):
    """What the commands read of the master, and ask of it."""
    config: Config
    stopping: bool
    bus: Bus | None

    def stop(self, graceful: bool) -> None: ...

    def scale(self, count: int) -> str | None:
        """An error text, or None once the change is under way."""

    def snapshot(self) -> dict[str, Any]:
        """The master's own counters and state."""

    def last_known(self, pids: list[int]) -> list[dict[str, Any]]:
        """The scoreboard snapshots of those running workers (that did not answer)."""


class Commands:
    def __init__(self, owner: Owner, slots: Slots, reload: Reload) -> None:
        self.owner = owner
        self.slots = slots
        self.reload = reload
        self._pending: list[Pending] = []

    def handle(self, conn: Connection, request: dict[str, Any]) -> None:
        """One request from the control socket; `conn` gets the reply now or later."""
        cmd = request["cmd"]
        if cmd not in COMMANDS:
            conn.fail(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
            return
        if self.owner.stopping and cmd != "stop":
            conn.fail("meteorit is stopping")
            return
        getattr(self, f"cmd_{cmd}")(conn, request)

    # --- the commands

    def cmd_workers(self, conn: Connection, request: dict[str, Any]) -> None:
        conn.respond({"ok": True, "workers": self.slots.rows()})

    def cmd_status(self, conn: Connection, request: dict[str, Any]) -> None:
        def reply(replies: dict[int, bytes], missing: list[int]) -> Reply:
            snaps = {pid: msgpack.unpackb(data) for pid, data in replies.items()}
            rows = self.slots.rows()
            for row in rows:
                snap = snaps.get(row["pid"])
                row["requests"] = sum(snap["requests"].values()) if snap else None
                if snap and snap.get("redis_topology", {}).get("unreachable"):
                    row["unreachable_shards"] = snap["redis_topology"]["unreachable"]
            # The topology as the workers see it: the first answer, with every shard any
            # worker could not reach (they learn of a failover each on its own).
            redis = next((s["redis_topology"] for s in snaps.values() if "redis_topology" in s), None)
            if redis is not None:
                redis["unreachable"] = sorted({shard for s in snaps.values()
                                               for shard in s.get("redis_topology", {}).get("unreachable", [])})
            return {"ok": True, "master": self.owner.snapshot(), "workers": rows, "missing_workers": missing,
                    "redis": redis}
        self._gather(conn, STATS_ALERT, b"", STATS_TIMEOUT, None, reply)

    def cmd_stats(self, conn: Connection, request: dict[str, Any]) -> None:
        def reply(replies: dict[int, bytes], missing: list[int]) -> Reply:
            workers = [msgpack.unpackb(data) for data in replies.values()]
            return {"ok": True, **metrics.stats_document(workers, missing, self.owner.snapshot(),
                                                         self.owner.last_known(missing))}
        self._gather(conn, STATS_ALERT, b"", STATS_TIMEOUT, None, reply)

    def cmd_reload(self, conn: Connection, request: dict[str, Any]) -> None:
        self.reload.start(conn.respond)

    def cmd_broadcast(self, conn: Connection, request: dict[str, Any]) -> None:
        self._alert(conn, request, None)

    def cmd_send(self, conn: Connection, request: dict[str, Any]) -> None:
        pid = request.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int):
            conn.fail("send needs a pid (an integer)")
            return
        self._alert(conn, request, pid)

    def cmd_scale(self, conn: Connection, request: dict[str, Any]) -> None:
        count = request.get("workers")
        if isinstance(count, bool) or not isinstance(count, int):
            conn.fail("scale needs a number of workers")
            return
        error = self.owner.scale(count)
        if error:
            conn.fail(error)
            return

        def settled() -> Reply | None:
            return {"ok": True, "workers": count} if self.slots.settled(count) else None

        def expire() -> Reply:
            return {"ok": False, "error": f"not settled at {count} workers in {settle:.0f}s",
                    "workers": self.slots.rows()}
        settle = BOOT_DEADLINE + self.owner.config.server.graceful_timeout + KILL_GRACE  # boots and QUITs
        self._wait(conn, settled, expire, settle)

    def cmd_stop(self, conn: Connection, request: dict[str, Any]) -> None:
        graceful = bool(request.get("graceful", False))
        conn.respond({"ok": True, "stopping": "graceful" if graceful else "fast"})
        self.owner.stop(graceful=graceful)

    # --- alerts to the workers

    def _alert(self, conn: Connection, request: dict[str, Any], pid: int | None) -> None:
        """broadcast (pid None) or send; with `wait`, the replies of the workers."""
        bus = self.owner.bus
        assert bus is not None
        name, data, wait = request.get("name"), request.get("data", b""), request.get("wait", 0)
        if not isinstance(name, str) or not name:
            conn.fail("an alert needs a name")
            return
        if name in RESERVED_ALERTS:
            conn.fail(f"{name!r} is a built-in alert of meteorit's own processes")
            return
        if not isinstance(data, (bytes, str)):
            conn.fail("alert data must be bytes or a string")
            return
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT:
            conn.fail(f"wait must be 0 to {MAX_WAIT:.0f} seconds")
            return
        targets = [pid] if pid is not None else bus.worker_pids
        if not wait:
            try:
                bus.send(pid, name, data) if pid is not None else bus.broadcast(name, data)
            except IpcError as exc:
                conn.fail(str(exc))
                return
            conn.respond({"ok": True, "sent_to": targets})
            return

        def reply(replies: dict[int, bytes], missing: list[int]) -> Reply:
            return {"ok": True, "sent_to": targets, "missing": missing,
                    "replies": [{"pid": p, "data": d} for p, d in sorted(replies.items())]}
        self._gather(conn, name, data, float(wait), pid, reply)

    def _gather(self, conn: Connection, name: str, data: bytes | str, timeout: float, pid: int | None,
                reply: Gathered) -> None:
        """Send to `pid` (or broadcast), then answer `conn` with `reply(replies, missing)` once
        every addressee answered or at the timeout."""
        bus = self.owner.bus
        assert bus is not None
        try:
            if pid is not None:
                alert_id = bus.send(pid, name, data)
                waiter = bus.expect(alert_id, {pid})
            else:
                expected = set(bus.worker_pids)
                alert_id = bus.broadcast(name, data)
                waiter = bus.expect(alert_id, expected)
        except IpcError as exc:
            conn.fail(str(exc))
            return
        self._wait(conn, lambda: reply(waiter.replies, []) if waiter.complete else None,
                   lambda: reply(waiter.replies, waiter.missing), timeout, alert_id)

    # --- requests that wait

    def _wait(self, conn: Connection, poll: Callable[[], Reply | None],
              expire: Callable[[], Reply], timeout: float, alert_id: int = 0) -> None:
        pending = Pending(poll, expire, time.monotonic() + timeout, conn.respond, alert_id)
        self._pending.append(pending)
        self.answer_pending()

    def answer_pending(self) -> None:
        """Every waiting request whose reply is ready, or whose deadline passed, is answered."""
        now = time.monotonic()
        for pending in list(self._pending):
            reply = pending.poll()
            if reply is None and now >= pending.deadline:
                reply = pending.expire()
            if reply is not None:
                self._pending.remove(pending)
                if pending.alert_id and self.owner.bus is not None:
                    self.owner.bus.forget_waiter(pending.alert_id)
                pending.respond(reply)

    def deadlines(self) -> list[float]:
        """When the waiting requests expire (the master's loop wakes up for them)."""
        return [p.deadline for p in self._pending]
