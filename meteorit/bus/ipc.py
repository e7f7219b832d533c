"""The IPC bus: OpenResty's ngx.ipc for meteorit. Named alerts between the master and
the workers over Unix pipes, in packets of at most PIPE_BUF bytes (see meteorit.bus.wire).

    from meteorit import ipc
    ipc.send(pid, "hello", b"data")          # to one process; IpcError for an unknown pid
    ipc.broadcast("hello", b"data")          # to every worker, the sender included
    ipc.receive("hello", handler)            # handler(data: bytes); sync or async
    ipc.receive({"a": h1, "b": h2})          # several at once
    ipc.receive("hello", None)               # remove; alerts with no handler are dropped (counted)
    ipc.reply("hello-response", b"hi")       # only inside a handler, else IpcError
    ipc.sender                               # the sender's pid inside a handler, else None
    await ipc.request(pid, "name", b"", 1.0) # the reply's data; TimeoutError past the timeout
    await ipc.gather("name", b"", 1.0)       # {pid: reply} of every worker that answered in time

Owns: reading and writing the pipes (one per slot, made by meteorit.bus.pipes before
fork; every process writes to every pipe, reads only its own), the per-destination write
queues, reassembly, handler dispatch and the slot → pid table. It is the only module that
writes to pipes.
Must not touch: HTTP, Redis, process management (the master tells it the table).

Writes never block: pipes are non-blocking; on EAGAIN the packets wait in their
destination's queue, in order, and leave when the pipe is writable. A queue holds at most
`max_queue` bytes; past it `send` raises IpcError instead of growing. Small packets
queued for one pipe leave together in one write() of at most PIPE_BUF bytes, which stays
atomic however many processes write to that pipe.

The master alone decides the table and broadcasts it as the reserved alert `ipc.table`
on every change; a process drops the partial alerts of pids that left it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import selectors
import time
from collections import deque
from typing import Any, Awaitable, Callable, Mapping, Union

import msgpack

from ..errors import IpcError
from .pipes import MASTER_SLOT, Pipes
from .waiters import Waiter, resolver
from .wire import (HEADER_SIZE, PAYLOAD, PIPE_BUF, Alert, Reassembler, check_size, crc32, cut_body,
                   frame, name_prefix, whole_packet)

log = logging.getLogger("meteorit.ipc")

TABLE_ALERT = "ipc.table"
MAX_QUEUE = 64 * 1024 * 1024  # bytes waiting for one destination
READ_SIZE = 64 * 1024  # one read of 10-byte alerts is ~1300 alerts, ~5 ms to deliver
MAX_NAMES = 1024  # alert names whose encoded prefix a sender keeps
READ_BUDGET = 0.002  # seconds of reading per wake-up: an alert flood must not starve HTTP

Handler = Callable[[bytes], Union[None, Awaitable[None]]]
Data = Union[bytes, bytearray, memoryview, str]
Watch = Callable[[int, int, bool], None]  # (fd, slot, want writable events)

# The alert whose handler runs (its sender pid and slot, its id); a context variable, so
# it holds across awaits in a coroutine handler and never leaks into other tasks.
_current: contextvars.ContextVar[Alert | None] = contextvars.ContextVar("ipc_current", default=None)


class Bus:
    def __init__(self, pipes: Pipes, slot: int, pid: int, table: Mapping[int, int],
                 max_queue: int = MAX_QUEUE) -> None:
        self.pipes = pipes
        self.slot = slot
        self.pid = pid
        self.watch: Watch = _no_watch
        self.watching: set[int] = set()
        # In a worker, a queue that was idle is written at the end of the loop iteration,
        # so the alerts sent meanwhile share writes (and wake the reader once, not each).
        self.defer: Callable[[Callable[[int], None], int], object] | None = None
        self.max_queue = max_queue
        self.read_fd = pipes.fds[slot][0]
        self.reassembler = Reassembler(pid)
        self.handlers: dict[str, Handler] = {}
        self.table: dict[int, int] = {}
        self.slot_of: dict[int, int] = {}
        self.worker_table: list[tuple[int, int]] = []  # (slot, pid) of every worker, by slot
        self.queues: dict[int, deque[bytes | bytearray]] = {s: deque() for s in pipes.fds}
        self.queued: dict[int, int] = {s: 0 for s in pipes.fds}
        self.waiters: dict[int, Waiter] = {}
        self._next_id = 0
        self._prefixes: dict[str, tuple[bytes, int]] = {}  # name -> (body prefix, its CRC)
        self._tasks: set[asyncio.Task[Any]] = set()
        # counters
        self.sent = 0
        self.received = 0
        self.unhandled = 0
        self.handler_errors = 0
        self.set_table({**table, slot: pid})

    # --- the table

    def set_table(self, table: Mapping[int, int]) -> None:
        gone = set(self.table.values()) - set(table.values())
        for slot, pid in self.table.items():
            if table.get(slot) != pid and slot in self.queues and slot != self.slot:
                # packets still queued for a pid that left would only be dropped by its successor
                self.queued[slot] = 0
                self.queues[slot].clear()
        self.table = dict(table)
        self.slot_of = {pid: slot for slot, pid in self.table.items()}
        self.worker_table = [(slot, pid) for slot, pid in sorted(self.table.items()) if slot != MASTER_SLOT]
        for pid in gone:
            self.reassembler.forget(pid)
            for waiter in list(self.waiters.values()):
                waiter.forget(pid)

    def announce_table(self) -> None:
        """Master only: tell every worker the current table."""
        body = msgpack.packb(self.table)
        full = []
        for slot, pid in self.table.items():
            if slot != MASTER_SLOT:
                try:
                    self._send_to(slot, pid, TABLE_ALERT, body)
                except IpcError:
                    full.append(pid)  # one stuck worker must not keep the others out of date
        if full:
            raise IpcError(f"table not announced to pids {full}: their queues are full")

    @property
    def worker_pids(self) -> list[int]:
        return [pid for _slot, pid in self.worker_table]

    # --- sending

    def send(self, pid: int, name: str, data: Data = b"", reply_to: int = 0) -> int:
        slot = self.slot_of.get(pid)
        if slot is None:
            raise IpcError(f"no process with pid {pid} on the bus")
        return self._send_to(slot, pid, name, data, reply_to)

    def broadcast(self, name: str, data: Data = b"") -> int:
        """To every worker (the sender included, if a worker). Returns the alert id."""
        data = data if type(data) is bytes else _as_bytes(data)
        prefix, prefix_crc = self._prefix(name)
        _check_size(prefix, data)
        total = len(prefix) + len(data)
        # the payload CRCs once for every destination
        payloads = cut_body(prefix, data) if total > PAYLOAD else None
        size = total + HEADER_SIZE * (len(payloads) if payloads else 1)  # what will be queued
        # all or nothing: a caller that gets an error can retry without duplicates
        full = [pid for slot, pid in self.worker_table if self.queued[slot] + size > self.max_queue]
        if full:
            raise IpcError(f"broadcast {name!r} not sent: the queues to pids {full} are full")
        alert_id = self._new_id()
        payload_crc = 0 if payloads else crc32(data, prefix_crc)
        for slot, pid in self.worker_table:
            if payloads:
                packets = frame(payloads, total, self.pid, self.slot, pid, alert_id)
            else:
                packets = [whole_packet(prefix, payload_crc, data, self.pid, self.slot, pid, alert_id, 0)]
            self._enqueue(slot, packets)
        return alert_id

    def _send_to(self, slot: int, pid: int, name: str, data: Data, reply_to: int = 0) -> int:
        data = data if type(data) is bytes else _as_bytes(data)
        try:
            prefix, prefix_crc = self._prefixes[name]
        except (KeyError, TypeError):  # a new name, or not a str at all
            prefix, prefix_crc = self._prefix(name)
        if len(prefix) + len(data) > PAYLOAD:
            _check_size(prefix, data)
            alert_id = self._new_id()
            self._enqueue(slot, frame(cut_body(prefix, data), len(prefix) + len(data), self.pid,
                                      self.slot, pid, alert_id, reply_to))
            return alert_id
        # most alerts: one packet, built in one go and added to the queue's last write unit
        self._next_id = alert_id = self._next_id % 0xFFFFFFFF + 1  # as _new_id()
        packet = whole_packet(prefix, crc32(data, prefix_crc), data, self.pid, self.slot, pid,
                              alert_id, reply_to)
        queue = self.queues[slot]
        queued = self.queued[slot] + len(packet)
        if queued > self.max_queue:
            raise IpcError(f"queue to slot {slot} is full ({self.queued[slot]} bytes waiting)")
        self.queued[slot] = queued
        self.sent += 1
        if queue and type(tail := queue[-1]) is bytearray and len(tail) + len(packet) <= PIPE_BUF:
            tail += packet
        else:
            was_idle = not queue
            queue.append(bytearray(packet) if len(packet) <= PIPE_BUF // 2 else packet)
            if was_idle:
                self._start_drain(slot)
        return alert_id

    def _prefix(self, name: str) -> tuple[bytes, int]:
        """A name's prefix (length byte and UTF-8) and its CRC, kept for the next alerts."""
        if not isinstance(name, str):
            raise IpcError(f"alert name must be a str, not {type(name).__name__}")
        entry = self._prefixes.get(name)
        if entry is None:
            try:
                prefix = name_prefix(name)
            except ValueError as exc:
                raise IpcError(str(exc)) from None
            entry = (prefix, crc32(prefix))
            if len(self._prefixes) < MAX_NAMES:
                self._prefixes[name] = entry
        return entry

    def _new_id(self) -> int:
        self._next_id = self._next_id % 0xFFFFFFFF + 1  # never 0: 0 means "not a reply"
        return self._next_id

    def _enqueue(self, slot: int, packets: list[bytes]) -> None:
        """Queue the packets of one alert. A queue holds write units, each written with
        one write() of at most PIPE_BUF bytes of whole packets, so it is atomic: a small
        packet joins the last unit while it fits (send() does the same inline)."""
        size = sum(map(len, packets))
        if self.queued[slot] + size > self.max_queue:
            raise IpcError(f"queue to slot {slot} is full ({self.queued[slot]} bytes waiting)")
        queue = self.queues[slot]
        was_idle = not queue
        for packet in packets:
            if queue and type(tail := queue[-1]) is bytearray and len(tail) + len(packet) <= PIPE_BUF:
                tail += packet
            else:
                queue.append(bytearray(packet) if len(packet) <= PIPE_BUF // 2 else packet)
        self.queued[slot] += size
        self.sent += 1
        if was_idle:
            self._start_drain(slot)

    def _start_drain(self, slot: int) -> None:
        if self.defer is not None:
            self.defer(self._drain, slot)
        else:
            self._drain(slot)

    def on_writable(self, slot: int) -> None:
        self._drain(slot)

    def _drain(self, slot: int) -> None:
        queue = self.queues[slot]
        fd = self.pipes.fds[slot][1]
        while queue:
            unit = queue[0]
            try:
                os.write(fd, unit)  # <= PIPE_BUF bytes to a pipe: all of it or EAGAIN
            except BlockingIOError:
                if fd not in self.watching:
                    self.watching.add(fd)
                    self.watch(fd, slot, True)
                return
            queue.popleft()
            self.queued[slot] -= len(unit)
        if fd in self.watching:
            self.watching.discard(fd)
            self.watch(fd, slot, False)

    # --- hosts: an asyncio loop (workers) or a selector (the master)

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        def watch(fd: int, slot: int, want: bool) -> None:
            if want:
                loop.add_writer(fd, self.on_writable, slot)
            else:
                loop.remove_writer(fd)
        self.watch = watch
        self.defer = loop.call_soon
        loop.add_reader(self.read_fd, self.on_readable)

    def attach_selector(self, selector: selectors.BaseSelector) -> None:
        """Events carry ("ipc-read", None) or ("ipc-write", slot) as their data."""
        def watch(fd: int, slot: int, want: bool) -> None:
            if want:
                selector.register(fd, selectors.EVENT_WRITE, ("ipc-write", slot))
            else:
                selector.unregister(fd)
        self.watch = watch
        selector.register(self.read_fd, selectors.EVENT_READ, ("ipc-read", None))

    # --- receiving

    def receive(self, name: str | Mapping[str, Handler | None], handler: Handler | None = None) -> None:
        items = name.items() if isinstance(name, Mapping) else [(name, handler)]
        for alert_name, fn in items:
            if fn is None:
                self.handlers.pop(alert_name, None)
            elif not callable(fn):
                raise IpcError(f"handler for {alert_name!r} is not callable")
            else:
                self.handlers[alert_name] = fn

    def on_readable(self) -> None:
        """Read and deliver for at most READ_BUDGET; the reader is level-triggered, so
        what is left is read on the next wake-up, after the loop served the rest."""
        deadline = time.monotonic() + READ_BUDGET
        feed, handlers = self.reassembler.feed, self.handlers
        while True:
            try:
                data = os.read(self.read_fd, READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                return
            alerts = feed(data)
            self.received += len(alerts)
            for alert in alerts:
                handler = handlers.get(alert.name)
                if handler is not None and not alert.reply_to and alert.name != TABLE_ALERT:
                    self._run(handler, alert)  # most alerts: a handler, no reply awaited
                else:
                    self._deliver(alert)
            if len(data) < READ_SIZE or time.monotonic() > deadline:
                return

    def _deliver(self, alert: Alert) -> None:
        if alert.name == TABLE_ALERT and alert.sender_slot == MASTER_SLOT:
            try:
                table = msgpack.unpackb(alert.data, strict_map_key=False)
                if not isinstance(table, dict):
                    raise ValueError("not a map")
            except Exception as exc:  # never from our master; keep the table we have
                self.handler_errors += 1
                log.error("ignored a slot table that does not decode: %s", exc)
                return
            self.set_table(table)
            return
        waiter = self.waiters.get(alert.reply_to) if alert.reply_to else None
        if waiter is not None:
            waiter.add(alert.sender_pid, alert.data)
            return
        handler = self.handlers.get(alert.name)
        if handler is None:
            self.unhandled += 1
            return
        self._run(handler, alert)

    def _run(self, handler: Handler, alert: Alert) -> None:
        token = _current.set(alert)
        try:
            result = handler(alert.data)
            if result is not None and inspect.isawaitable(result):  # isawaitable(None) is slow
                task = asyncio.ensure_future(result)  # copies the context: sender holds across awaits
                self._tasks.add(task)
                task.add_done_callback(self._handler_done)
        except Exception:
            self.handler_errors += 1
            log.exception("ipc handler for %r failed", alert.name)
        finally:
            _current.reset(token)

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.handler_errors += 1
            log.error("ipc handler failed", exc_info=task.exception())

    # --- replies, requests

    def reply(self, name: str, data: Data = b"") -> None:
        current = _current.get()
        if current is None:
            raise IpcError("reply() is only allowed inside an alert handler")
        # To the sender's slot, from the packet header: the table may not list a worker
        # that was just forked yet. A stale slot is harmless: the reader's pid fence drops it.
        sender_pid, sender_slot, alert_id = current.sender_pid, current.sender_slot, current.alert_id
        if sender_slot not in self.queues:
            raise IpcError(f"the sender of this alert (pid {sender_pid}) has no pipe")
        self._send_to(sender_slot, sender_pid, name, data, alert_id)

    async def request(self, pid: int, name: str, data: Data = b"", timeout: float = 1.0) -> bytes:
        future: asyncio.Future[dict[int, bytes]] = asyncio.get_running_loop().create_future()
        alert_id = self.send(pid, name, data)
        self.waiters[alert_id] = Waiter({pid}, resolver(future))
        try:
            replies = await asyncio.wait_for(future, timeout)
        finally:
            self.waiters.pop(alert_id, None)
        if pid not in replies:
            raise IpcError(f"pid {pid} left the bus before replying to {name!r}")
        return replies[pid]

    async def gather(self, name: str, data: Data = b"", timeout: float = 1.0) -> dict[int, bytes]:
        future: asyncio.Future[dict[int, bytes]] = asyncio.get_running_loop().create_future()
        expected = set(self.worker_pids)
        alert_id = self.broadcast(name, data)
        waiter = self.waiters[alert_id] = Waiter(expected, resolver(future))
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.waiters.pop(alert_id, None)
        return dict(waiter.replies)

    def expect(self, alert_id: int, pids: set[int]) -> Waiter:
        """For hosts without asyncio (the master): collect the replies to `alert_id` from
        `pids`; poll `complete`, read `replies` and `missing`, and `forget_waiter` when done.
        A pid that leaves the table stops being waited for."""
        waiter = self.waiters[alert_id] = Waiter(set(pids) & set(self.slot_of))
        return waiter

    def forget_waiter(self, alert_id: int) -> None:
        self.waiters.pop(alert_id, None)

    def stats(self) -> dict[str, int]:
        r = self.reassembler
        return {"sent": self.sent, "received": self.received, "unhandled": self.unhandled,
                "handler_errors": self.handler_errors, "corrupt": r.corrupt, "stale": r.stale,
                "orphans": r.orphans, "queued_bytes": sum(self.queued.values())}


def _as_bytes(data: Data) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise IpcError(f"alert data must be bytes or str, not {type(data).__name__}")


def _check_size(prefix: bytes, data: bytes) -> None:
    try:
        check_size(prefix, data)
    except ValueError as exc:
        raise IpcError(str(exc)) from None


def _no_watch(fd: int, slot: int, want: bool) -> None:
    raise IpcError("the bus is not attached to a loop or selector")


# --- the module-level API, on this process's bus

_bus: Bus | None = None


def install(bus: Bus | None) -> None:
    global _bus
    _bus = bus


def bus() -> Bus:
    if _bus is None:
        raise IpcError("this process is not on the IPC bus")
    return _bus


def send(pid: int, name: str, data: Data = b"") -> None:
    bus().send(pid, name, data)


def broadcast(name: str, data: Data = b"") -> None:
    bus().broadcast(name, data)


def receive(name: str | Mapping[str, Handler | None], handler: Handler | None = None) -> None:
    bus().receive(name, handler)


def reply(name: str, data: Data = b"") -> None:
    bus().reply(name, data)


async def request(pid: int, name: str, data: Data = b"", timeout: float = 1.0) -> bytes:
    return await bus().request(pid, name, data, timeout)


async def gather(name: str, data: Data = b"", timeout: float = 1.0) -> dict[int, bytes]:
    return await bus().gather(name, data, timeout)


def __getattr__(name: str) -> Any:
    if name == "sender":
        current = _current.get()
        return None if current is None else current.sender_pid
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
