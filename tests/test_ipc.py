"""The IPC bus in one process: two to four Bus objects on one set of real pipes, each with
its own (fake) pid, on one event loop, as a worker runs it (uvloop) and on plain asyncio.
The bus never signals pids, so fake ones are safe; the pipes, the loop and the module API
are the real ones."""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import time
from typing import Any, Awaitable, Callable, Coroutine, Iterator

import msgpack
import pytest
import uvloop

from meteorit.bus import ipc
from meteorit.errors import IpcError
from meteorit.bus.ipc import MASTER_SLOT, TABLE_ALERT, Bus, Pipes
from meteorit.bus.wire import MAX_ALERT, MAX_NAME, PAYLOAD, PIPE_BUF, Reassembler, encode_body, packetize

M, A, B, C = 999, 1000, 1001, 1002  # fake pids: the master and workers in slots 0, 1, 2
TABLE = {MASTER_SLOT: M, 0: A, 1: B, 2: C}
SCENARIO_TIMEOUT = 20.0  # a scenario that hangs fails instead
WAIT = 5.0  # for something that must happen

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    def run(scenario: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(asyncio.wait_for(scenario, SCENARIO_TIMEOUT))
    return run


@pytest.fixture
def make_pipes() -> Iterator[Callable[[int], Pipes]]:
    made: list[Pipes] = []

    def make(slots: int) -> Pipes:
        made.append(Pipes(slots))
        return made[-1]

    yield make
    for pipes in made:
        for fd in pipes.all_fds():
            os.close(fd)


@pytest.fixture(autouse=True)
def no_module_bus() -> Iterator[None]:
    yield
    ipc.install(None)


class ErrorLog(logging.Handler):
    """The errors meteorit.bus.ipc logs, and a way to wait for them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    async def until(self, count: int) -> list[logging.LogRecord]:
        async with asyncio.timeout(WAIT):
            while len(self.records) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.records


@pytest.fixture
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger("meteorit.ipc")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


class Inbox:
    """A sync handler that records (ipc.sender, data) of every alert it gets."""

    def __init__(self) -> None:
        self.got: list[tuple[int | None, bytes]] = []
        self.changed = asyncio.Event()

    def __call__(self, data: bytes) -> None:
        self.got.append((ipc.sender, data))
        self.changed.set()

    async def until(self, count: int, timeout: float = WAIT) -> list[tuple[int | None, bytes]]:
        async with asyncio.timeout(timeout):
            while len(self.got) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.got

    @property
    def data(self) -> list[bytes]:
        return [data for _, data in self.got]


def on_bus(pipes: Pipes, slot: int, *, attach: bool = True, **kwargs: Any) -> Bus:
    bus = Bus(pipes, slot, TABLE[slot], {s: p for s, p in TABLE.items() if s in pipes.fds}, **kwargs)
    if attach:
        bus.attach_loop(asyncio.get_running_loop())
    return bus


async def settled(sender: Bus, dest: Bus) -> None:
    """Wait until `dest` has handled everything `sender` sent it so far: alerts of one
    sender to one destination arrive in order, so a marker sent now comes out last."""
    marker = Inbox()
    dest.receive("test.marker", marker)
    sender.send(dest.pid, "test.marker")
    await marker.until(1)
    dest.receive("test.marker", None)


# --- send and receive


def test_send_delivers_bytes_and_str_data_with_the_senders_pid(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        inbox = Inbox()
        b.receive("hello", inbox)
        a.send(B, "hello", b"\x00bytes\xff")
        a.send(B, "hello", "héllo ✓")
        a.send(B, "hello", bytearray(b"array"))
        a.send(B, "hello", memoryview(b"view"))
        a.send(B, "hello")
        a.send(B, "hello", "")
        assert await inbox.until(6) == [
            (A, b"\x00bytes\xff"), (A, "héllo ✓".encode()), (A, b"array"), (A, b"view"),
            (A, b""), (A, b"")]
        assert ipc.sender is None
        assert b.stats()["received"] == 6
        assert a.stats()["sent"] == 6

    run(scenario())


def test_an_alert_to_itself_and_a_255_byte_name(run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(1)
    name = "n" * MAX_NAME

    async def scenario() -> None:
        a = on_bus(pipes, 0)
        inbox = Inbox()
        a.receive(name, inbox)
        a.send(A, name, b"me")
        assert await inbox.until(1) == [(A, b"me")]

    run(scenario())


def test_receive_many_at_once_remove_one_and_unhandled_alerts_are_counted(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        first, second = Inbox(), Inbox()
        b.receive({"first": first, "second": second})
        a.send(B, "first", b"1")
        a.send(B, "second", b"2")
        await second.until(1)
        assert first.got == [(A, b"1")]
        assert b.stats()["unhandled"] == 0

        b.receive("first", None)
        b.receive("never-registered", None)  # removing what is not there is harmless
        a.send(B, "first", b"dropped")
        a.send(B, "nobody", b"dropped too")
        a.send(B, "second", b"3")
        await second.until(2)
        assert first.got == [(A, b"1")]
        assert second.got == [(A, b"2"), (A, b"3")]
        assert b.stats()["unhandled"] == 2

        b.receive({"first": first, "second": None})  # a mapping can add and remove
        a.send(B, "second", b"dropped")
        a.send(B, "first", b"4")
        await first.until(2)
        assert second.data == [b"2", b"3"]
        assert b.stats()["unhandled"] == 3

    run(scenario())


def test_a_handler_that_is_not_callable_is_refused(make_pipes: Callable[[int], Pipes]) -> None:
    bus = Bus(make_pipes(1), 0, A, {0: A})
    with pytest.raises(IpcError, match="not callable"):
        bus.receive("x", b"oops")  # type: ignore[arg-type]
    with pytest.raises(IpcError, match="not callable"):
        bus.receive({"y": "oops"})  # type: ignore[dict-item]


def test_a_10_mib_alert_crosses_a_smaller_pipe_through_the_queue(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)
    big = os.urandom(10 * 1024 * 1024)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        inbox = Inbox()
        b.receive({"big": inbox, "small": inbox})
        a.send(B, "small", b"before")
        a.send(B, "big", big)
        assert a.stats()["queued_bytes"] > 0  # the pipe (1 MiB at most) could not take it all
        a.send(B, "small", b"after")
        assert await inbox.until(3) == [(A, b"before"), (A, big), (A, b"after")]
        assert a.stats()["queued_bytes"] == 0
        assert b.reassembler.partial_bytes == 0

    run(scenario())


class RecordingOs:
    """The os module as meteorit.bus.ipc sees it, with every write() recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        written = os.write(fd, data)
        self.writes.append(bytes(data))
        return written


def test_alerts_sent_together_share_writes_of_whole_packets_none_over_pipe_buf(
        run: Run, make_pipes: Callable[[int], Pipes], monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = RecordingOs()
    monkeypatch.setattr(ipc, "os", recorder)
    pipes = make_pipes(2)
    sent = [bytes([i % 256]) * (i % 300) for i in range(2000)]
    sent[700] = os.urandom(3 * PAYLOAD)  # several packets, among small ones
    sent[1400] = os.urandom(PAYLOAD - 10)  # one packet of nearly PIPE_BUF

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        inbox = Inbox()
        b.receive("n", inbox)
        for data in sent:
            a.send(B, "n", data)
        assert await inbox.until(len(sent)) == [(A, data) for data in sent]

    run(scenario())
    writes = recorder.writes
    assert max(map(len, writes)) <= PIPE_BUF  # atomic, however many processes write
    reader = Reassembler(B)
    for chunk in writes:  # each write holds whole packets: nothing is left half-read
        reader.feed(chunk)
        assert not reader.buffer
    assert len(writes) < len(sent) / 10  # small alerts queued together left together


def test_broadcasts_sent_together_share_writes_too(
        run: Run, make_pipes: Callable[[int], Pipes], monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = RecordingOs()
    monkeypatch.setattr(ipc, "os", recorder)
    pipes = make_pipes(2)
    sent = [str(i).encode() * (i % 50) for i in range(1000)]

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        inboxes = {A: Inbox(), B: Inbox()}
        a.receive("news", inboxes[A])
        b.receive("news", inboxes[B])
        for data in sent:
            a.broadcast("news", data)
        for inbox in inboxes.values():
            assert await inbox.until(len(sent)) == [(A, data) for data in sent]

    run(scenario())
    assert max(map(len, recorder.writes)) <= PIPE_BUF
    assert len(recorder.writes) < 2 * len(sent) / 10  # not one write per alert and worker


def test_alerts_of_more_names_than_a_sender_keeps_all_arrive(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)
    names = [f"name.{i}" for i in range(ipc.MAX_NAMES + 200)]

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        got: list[tuple[str, bytes]] = []
        b.receive({name: (lambda data, name=name: got.append((name, data))) for name in names})
        for name in names + names[:3]:
            a.send(B, name, name.encode())
        await settled(a, b)
        assert got == [(name, name.encode()) for name in names + names[:3]]
        assert len(a._prefixes) == ipc.MAX_NAMES  # what a sender keeps is bounded

    run(scenario())


# --- handlers that fail


def test_a_sync_handler_that_raises_is_logged_and_the_bus_keeps_delivering(
        run: Run, make_pipes: Callable[[int], Pipes], errors: ErrorLog) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        inbox = Inbox()

        def boom(data: bytes) -> None:
            raise ValueError(f"bad {data!r}")

        b.receive({"boom": boom, "ok": inbox})
        a.send(B, "boom", b"1")
        a.send(B, "ok", b"2")
        a.send(B, "boom", b"3")
        a.send(B, "ok", b"4")
        assert await inbox.until(2) == [(A, b"2"), (A, b"4")]
        records = await errors.until(2)
        assert [str(r.exc_info[1]) for r in records if r.exc_info] == ["bad b'1'", "bad b'3'"]
        assert "boom" in records[0].getMessage()
        assert b.stats()["handler_errors"] == 2

    run(scenario())


def test_an_async_handler_that_raises_is_logged_and_the_bus_keeps_delivering(
        run: Run, make_pipes: Callable[[int], Pipes], errors: ErrorLog) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        inbox = Inbox()
        release = asyncio.Event()

        async def boom(data: bytes) -> None:
            await release.wait()
            raise ValueError(f"late {data!r}")

        b.receive({"boom": boom, "ok": inbox})
        a.send(B, "boom", b"1")
        a.send(B, "ok", b"2")  # handled while the coroutine waits
        assert await inbox.until(1) == [(A, b"2")]
        release.set()
        records = await errors.until(1)
        assert records[0].exc_info is not None and str(records[0].exc_info[1]) == "late b'1'"
        assert b.stats()["handler_errors"] == 1
        a.send(B, "ok", b"3")
        assert await inbox.until(2) == [(A, b"2"), (A, b"3")]

    run(scenario())


# --- reply and sender


def test_reply_in_a_handler_reaches_the_senders_handler_for_that_name(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(3)

    async def scenario() -> None:
        a, b, c = on_bus(pipes, 0), on_bus(pipes, 1), on_bus(pipes, 2)
        ipc.install(b)

        def ping(data: bytes) -> None:
            ipc.reply("pong", data + b"!")

        async def slow_ping(data: bytes) -> None:
            await asyncio.sleep(0)
            ipc.reply("pong", data + b"?")

        b.receive({"ping": ping, "slow-ping": slow_ping})
        pongs_a, pongs_c = Inbox(), Inbox()
        a.receive("pong", pongs_a)
        c.receive("pong", pongs_c)
        a.send(B, "ping", b"from a")
        c.send(B, "slow-ping", b"from c")
        c.send(B, "ping", b"again c")
        assert await pongs_a.until(1) == [(B, b"from a!")]
        assert sorted(await pongs_c.until(2)) == [(B, b"again c!"), (B, b"from c?")]
        await settled(b, a)
        assert pongs_a.got == [(B, b"from a!")]

    run(scenario())


def test_reply_outside_a_handler_raises(run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        with pytest.raises(IpcError, match="inside an alert handler"):
            a.reply("x", b"")
        ipc.install(a)
        with pytest.raises(IpcError, match="inside an alert handler"):
            ipc.reply("x", b"")
        inbox = Inbox()
        a.receive("hi", inbox)
        b.send(A, "hi")
        await inbox.until(1)
        with pytest.raises(IpcError, match="inside an alert handler"):  # not after one either
            ipc.reply("x", b"")

    run(scenario())


def test_sender_is_right_in_sync_and_async_handlers_running_concurrently(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(3)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b, c = on_bus(pipes, 0), on_bus(pipes, 1), on_bus(pipes, 2)
        ipc.install(b)
        parked = {b"a": loop.create_future(), b"c": loop.create_future()}
        gate = asyncio.Event()
        seen: dict[bytes, tuple[int | None, int | None]] = {}

        async def slow(data: bytes) -> None:
            before = ipc.sender
            parked[data].set_result(None)
            await gate.wait()
            seen[data] = (before, ipc.sender)
            ipc.reply("done", data)

        quick = Inbox()
        b.receive({"slow": slow, "quick": quick})
        done_a, done_c = Inbox(), Inbox()
        a.receive("done", done_a)
        c.receive("done", done_c)

        a.send(B, "slow", b"a")
        await asyncio.wait_for(parked[b"a"], WAIT)
        c.send(B, "slow", b"c")
        await asyncio.wait_for(parked[b"c"], WAIT)
        # both coroutines are parked; meanwhile sync handlers see their own sender
        c.send(B, "quick", b"q1")
        a.send(B, "quick", b"q2")
        assert sorted(await quick.until(2)) == [(A, b"q2"), (C, b"q1")]
        assert ipc.sender is None
        gate.set()
        assert await done_a.until(1) == [(B, b"a")]
        assert await done_c.until(1) == [(B, b"c")]
        assert seen == {b"a": (A, A), b"c": (C, C)}
        assert ipc.sender is None

    assert ipc.sender is None
    run(scenario())


# --- errors a caller sees


def test_bad_sends_raise_ipc_error_and_nothing_leaves(run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        inbox = Inbox()
        b.receive("ok", inbox)
        with pytest.raises(IpcError, match="4321"):
            a.send(4321, "ok", b"")
        for name in ["", "n" * (MAX_NAME + 1), "é" * 128]:
            with pytest.raises(IpcError, match="name"):
                a.send(B, name, b"")
            with pytest.raises(IpcError, match="name"):
                a.broadcast(name, b"")
        with pytest.raises(IpcError, match="str"):
            a.send(B, b"ok", b"")  # type: ignore[arg-type]
        for data in [None, 42, ["list"], {"a": 1}]:
            with pytest.raises(IpcError, match="bytes or str"):
                a.send(B, "ok", data)  # type: ignore[arg-type]
            with pytest.raises(IpcError, match="bytes or str"):
                a.broadcast("ok", data)  # type: ignore[arg-type]
        with pytest.raises(IpcError, match="over the limit"):
            a.send(B, "ok", bytes(MAX_ALERT - 2))  # body one byte over
        assert a.stats()["queued_bytes"] == 0
        a.send(B, "ok", b"the only one")
        assert await inbox.until(1) == [(A, b"the only one")]
        await settled(a, b)
        assert inbox.got == [(A, b"the only one")]
        assert b.stats()["unhandled"] == 0
        assert a.stats()["sent"] == 2  # the marker of settled() and the good one

    run(scenario())


def test_the_module_api_raises_when_no_bus_is_installed(run: Run) -> None:
    ipc.install(None)
    with pytest.raises(IpcError):
        ipc.bus()
    with pytest.raises(IpcError):
        ipc.send(A, "x", b"")
    with pytest.raises(IpcError):
        ipc.broadcast("x", b"")
    with pytest.raises(IpcError):
        ipc.receive("x", lambda data: None)
    with pytest.raises(IpcError):
        ipc.reply("x", b"")
    with pytest.raises(IpcError):
        run(ipc.request(A, "x", b"", 0.1))
    with pytest.raises(IpcError):
        run(ipc.gather("x", b"", 0.1))
    assert ipc.sender is None


def test_the_module_api_works_on_the_installed_bus(run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        ipc.install(a)
        inbox_a, inbox_b = Inbox(), Inbox()
        ipc.receive("hi", inbox_a)
        b.receive({"hi": inbox_b, "ask": lambda data: b.reply("answer", data * 2)})
        ipc.send(B, "hi", "direct")
        ipc.broadcast("hi", b"all")
        assert await inbox_a.until(1) == [(A, b"all")]
        assert await inbox_b.until(2) == [(A, b"direct"), (A, b"all")]
        assert await ipc.request(B, "ask", b"ab", WAIT) == b"abab"
        assert await ipc.gather("hi", b"", 0.05) == {}  # nobody answers "hi"

    run(scenario())


# --- request and gather


def test_request_returns_the_reply(run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        replies_seen_by_handler = Inbox()
        a.receive("answer", replies_seen_by_handler)

        async def slow_answer(data: bytes) -> None:
            await asyncio.sleep(0)
            b.reply("answer", data.upper())

        b.receive({"ask": lambda data: b.reply("answer", data[::-1]), "slow-ask": slow_answer})
        assert await a.request(B, "ask", b"abc", WAIT) == b"cba"
        assert await a.request(B, "slow-ask", "xyz", WAIT) == b"XYZ"
        results = await asyncio.gather(*(a.request(B, "ask", str(i), WAIT) for i in range(20)))
        assert results == [str(i)[::-1].encode() for i in range(20)]
        await settled(b, a)
        assert replies_seen_by_handler.got == []  # a reply awaited by request() is its result

    run(scenario())


def test_request_raises_timeout_error_when_nobody_replies(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        silent = Inbox()
        b.receive({"silent": silent, "ask": lambda data: b.reply("answer", data)})
        with pytest.raises(TimeoutError):
            await a.request(B, "silent", b"1", 0.05)
        assert await silent.until(1) == [(A, b"1")]
        with pytest.raises(TimeoutError):
            await a.request(B, "no-handler", b"2", 0.05)
        await settled(a, b)
        assert b.stats()["unhandled"] == 1
        # the bus is fine afterwards
        assert await a.request(B, "ask", b"3", WAIT) == b"3"

    run(scenario())


def test_a_late_reply_goes_to_the_handler_for_its_name(run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        release = asyncio.Event()

        async def slow(data: bytes) -> None:
            await release.wait()
            b.reply("answer", b"too late")

        b.receive("ask", slow)
        late = Inbox()
        a.receive("answer", late)
        with pytest.raises(TimeoutError):
            await a.request(B, "ask", b"q", 0.05)
        release.set()  # b answers only now
        assert await late.until(1) == [(B, b"too late")]

    run(scenario())


def gather_buses(pipes: Pipes) -> tuple[Bus, Bus, Bus, Inbox]:
    """a and b answer "count" with their pid; c gets it and never answers."""
    a, b, c = on_bus(pipes, 0), on_bus(pipes, 1), on_bus(pipes, 2)
    for bus in (a, b):
        bus.receive("count", lambda data, bus=bus: bus.reply("count", b"%d" % bus.pid))
    mute = Inbox()
    c.receive("count", mute)
    return a, b, c, mute


def test_gather_returns_the_replies_in_time_and_leaves_out_the_silent(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(3)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b, c, mute = gather_buses(pipes)
        started = loop.time()
        assert await a.gather("count", b"?", 0.2) == {A: b"1000", B: b"1001"}
        assert loop.time() - started >= 0.18  # it waited for c up to the timeout
        assert await mute.until(1) == [(A, b"?")]  # c was asked

    run(scenario())


def test_gather_returns_as_soon_as_every_worker_answered(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(3)

    async def scenario() -> None:
        a, b, c, _ = gather_buses(pipes)
        c.receive("count", lambda data: c.reply("count", b"c"))
        m = on_bus(pipes, MASTER_SLOT)
        # a timeout far longer than the test may run: only the answers can end the wait
        assert await asyncio.wait_for(a.gather("count", b"", 60), WAIT) == {
            A: b"1000", B: b"1001", C: b"c"}
        assert await asyncio.wait_for(m.gather("count", b"", 60), WAIT) == {
            A: b"1000", B: b"1001", C: b"c"}

    run(scenario())


def test_a_worker_that_answered_and_then_left_still_counts_in_gather(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(3)

    async def scenario() -> None:
        a, b, c, mute = gather_buses(pipes)
        asked = Inbox()
        b.receive("count", lambda data: (asked(data), b.reply("count", b"b")))
        gathering = asyncio.ensure_future(a.gather("count", b"", 60))
        await asked.until(1)
        await settled(b, a)  # b's answer is in
        await mute.until(1)
        a.set_table({MASTER_SLOT: M, 0: A})  # b and c are gone
        assert await asyncio.wait_for(gathering, WAIT) == {A: b"1000", B: b"b"}

    run(scenario())


def test_gather_with_no_workers_returns_at_once(run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(0)  # only the master's pipe

    async def scenario() -> None:
        m = on_bus(pipes, MASTER_SLOT)
        assert m.worker_pids == []
        # nobody to wait for: a long timeout must not be spent waiting
        assert await asyncio.wait_for(m.gather("count", b"", 60), WAIT) == {}

    run(scenario())


def test_reply_reaches_a_sender_the_table_does_not_list_yet(
        run: Run, make_pipes: Callable[[int], Pipes], errors: ErrorLog) -> None:
    # A worker just spawned knows the others from its table at fork, while the master's
    # announcement of its pid may still be on its way to them: their replies must reach it.
    pipes = make_pipes(2)
    newcomer = 2001

    async def scenario() -> None:
        a = on_bus(pipes, 0)
        b2 = Bus(pipes, 1, newcomer, {MASTER_SLOT: M, 0: A})
        b2.attach_loop(asyncio.get_running_loop())
        assert newcomer not in a.table.values()
        a.receive("ping", lambda data: a.reply("pong", data))
        pong = Inbox()
        b2.receive("pong", pong)
        b2.send(A, "ping", b"hello")
        await settled(b2, a)  # a's handler has run
        assert [(r.getMessage(), r.exc_info and str(r.exc_info[1])) for r in errors.records] == []
        assert a.stats()["handler_errors"] == 0
        assert await pong.until(1) == [(A, b"hello")]

    run(scenario())


# --- broadcast and the table


def test_broadcast_reaches_every_worker_once_and_not_the_master(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(3)

    async def scenario() -> None:
        buses = {pid: on_bus(pipes, slot) for slot, pid in TABLE.items()}
        inboxes = {pid: Inbox() for pid in buses}
        for pid, bus in buses.items():
            bus.receive("news", inboxes[pid])
        buses[A].broadcast("news", b"from a")
        buses[M].broadcast("news", b"from m")
        for pid in (A, B, C):
            assert sorted(await inboxes[pid].until(2)) == [(M, b"from m"), (A, b"from a")]
        for dest in buses.values():
            await settled(buses[A], dest)
            await settled(buses[M], dest)
        assert inboxes[M].got == []
        for pid in (A, B, C):
            assert len(inboxes[pid].got) == 2

    run(scenario())


def test_broadcast_is_all_or_nothing_when_one_queue_is_full(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(3)

    async def scenario() -> None:
        a = on_bus(pipes, 0, max_queue=256 * 1024)
        b, c = on_bus(pipes, 1), on_bus(pipes, 2, attach=False)  # c never reads
        news = Inbox()
        b.receive("news", news)
        with pytest.raises(IpcError, match="full"):
            while True:  # fill a's queue to c (its pipe fills first)
                a.send(C, "fill", bytes(64 * 1024))
        with pytest.raises(IpcError, match=f"pids \\[{C}\\] are full"):
            a.broadcast("news", b"x" * 128 * 1024)
        a.send(B, "news", b"after")
        assert await news.until(1) == [(A, b"after")]  # the refused broadcast reached nobody

    run(scenario())


def test_set_table_dropping_a_pid_ends_gather_and_request_and_frees_its_partials(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(3)

    async def scenario() -> None:
        a, b, c, mute = gather_buses(pipes)
        # c dies mid-alert: the first packet of an alert to a is in a's pipe, not the rest
        half = packetize(encode_body("big", bytes(3 * PAYLOAD)), C, 2, A, 77)
        os.write(pipes.fds[0][1], half[0])
        await settled(b, a)  # b's marker went into a's pipe after c's packet
        assert a.reassembler.partial_bytes == PAYLOAD
        big = Inbox()
        a.receive("big", big)

        gathering = asyncio.ensure_future(a.gather("count", b"", 60))
        requesting = asyncio.ensure_future(a.request(C, "count", b"", 60))
        await mute.until(2)  # c got both and will never answer
        a.set_table({MASTER_SLOT: M, 0: A, 1: B})
        assert await asyncio.wait_for(gathering, WAIT) == {A: b"1000", B: b"1001"}
        with pytest.raises(IpcError, match="left the bus"):
            await asyncio.wait_for(requesting, WAIT)
        assert a.reassembler.partial_bytes == 0
        with pytest.raises(IpcError, match=str(C)):
            a.send(C, "count", b"")
        # what the dead sender still had in the pipe is dropped, not half-delivered
        os.write(pipes.fds[0][1], b"".join(half[1:]))
        await settled(b, a)
        assert big.got == []
        assert a.stats()["orphans"] == len(half) - 1
        assert a.reassembler.partial_bytes == 0

    run(scenario())


def test_the_masters_table_reaches_workers_and_a_successor_reads_nothing_stale(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)
    b2_pid = 2001

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        m, a, b = on_bus(pipes, MASTER_SLOT), on_bus(pipes, 0), on_bus(pipes, 1)
        # b stops reading (dies) with an alert for it still in its pipe
        loop.remove_reader(b.read_fd)
        a.send(B, "work", b"for the old b")
        b2 = Bus(pipes, 1, b2_pid, {MASTER_SLOT: M, 0: A, 1: b2_pid})
        work = Inbox()
        b2.receive("work", work)
        b2.attach_loop(loop)
        with pytest.raises(IpcError):
            a.send(b2_pid, "work", b"")  # a does not know b2 yet

        # the master alone announces the new table
        m.set_table({MASTER_SLOT: M, 0: A, 1: b2_pid})
        m.announce_table()
        await settled(m, a)  # the table alert came first
        a.send(b2_pid, "work", b"for b2")
        assert await work.until(1) == [(A, b"for b2")]
        await settled(a, b2)
        assert work.got == [(A, b"for b2")]
        assert b2.stats()["stale"] == 1
        with pytest.raises(IpcError):
            a.send(B, "work", b"")
        assert a.worker_pids == [A, b2_pid]

    run(scenario())


def test_a_table_alert_from_a_worker_is_not_obeyed(run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(2)

    async def scenario() -> None:
        a, b = on_bus(pipes, 0), on_bus(pipes, 1)
        b.send(A, TABLE_ALERT, msgpack.packb({0: A}))
        await settled(b, a)
        assert a.worker_pids == [A, B]
        assert a.stats()["unhandled"] == 1

    run(scenario())


# --- a full pipe


def test_a_destination_that_stops_reading_fills_a_bounded_queue_without_blocking_others(
        run: Run, make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(3)
    max_queue = 256 * 1024

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert not os.get_blocking(pipes.fds[2][1])  # else the sends below would hang
        a, b = on_bus(pipes, 0, max_queue=max_queue), on_bus(pipes, 1)
        c = on_bus(pipes, 2, attach=False)  # its reader never runs
        flow, fill = Inbox(), Inbox()
        b.receive("flow", flow)
        c.receive("fill", fill)

        accepted: list[bytes] = []
        for i in range(10_000):
            data = i.to_bytes(4, "big") * 2560  # 10 KiB: three packets
            try:
                a.send(C, "fill", data)
            except IpcError as exc:
                full = exc
                break
            accepted.append(data)
            if i % 10 == 0:
                a.send(B, "flow", b"%d" % i)
        else:
            pytest.fail("sends to a destination that never reads never failed")
        assert "full" in str(full)
        queued = a.stats()["queued_bytes"]
        assert max_queue - 11 * 1024 < queued <= max_queue
        with pytest.raises(IpcError):  # still full, and a refused alert queues nothing
            a.send(C, "fill", bytes(10 * 1024))
        assert a.stats()["queued_bytes"] == queued
        # the loop kept running and the other destination kept receiving
        flows = len(range(0, len(accepted), 10))
        a.send(B, "flow", b"after")
        assert (await flow.until(flows + 1))[-1] == (A, b"after")

        c.attach_loop(loop)  # it reads again: everything queued arrives, in order
        assert await fill.until(len(accepted), timeout=10) == [(A, data) for data in accepted]
        assert a.stats()["queued_bytes"] == 0
        assert (c.stats()["corrupt"], c.stats()["orphans"]) == (0, 0)
        a.send(C, "fill", b"and then")
        assert (await fill.until(len(accepted) + 1))[-1] == (A, b"and then")

    run(scenario())


# --- the master's host: a selector instead of an event loop


def pump(hosts: list[tuple[selectors.BaseSelector, Bus]], done: Callable[[], bool]) -> None:
    """The master's dispatch of "ipc-read" and "ipc-write" events, until `done`."""
    deadline = time.monotonic() + WAIT
    while not done():
        if time.monotonic() > deadline:
            pytest.fail("the bus did not deliver in time")
        for selector, bus in hosts:
            for key, _ in selector.select(0.01):
                kind, slot = key.data
                if kind == "ipc-read":
                    bus.on_readable()
                else:
                    bus.on_writable(slot)


def test_a_selector_hosted_bus_receives_replies_and_drains_a_full_pipe(
        make_pipes: Callable[[int], Pipes]) -> None:
    pipes = make_pipes(1)
    table = {MASTER_SLOT: M, 0: A}
    with selectors.DefaultSelector() as master_sel, selectors.DefaultSelector() as worker_sel:
        m, a = Bus(pipes, MASTER_SLOT, M, table), Bus(pipes, 0, A, table)
        m.attach_selector(master_sel)
        a.attach_selector(worker_sel)
        hello = Inbox()

        def on_hello(data: bytes) -> None:
            hello(data)
            m.reply("welcome", data.upper())

        m.receive("hello", on_hello)
        welcome = Inbox()
        a.receive({"welcome": welcome, "big": welcome})
        a.send(M, "hello", b"hi")
        pump([(master_sel, m)], lambda: bool(hello.got))
        assert hello.got == [(A, b"hi")]
        assert ipc.sender is None  # the master's own code runs outside any handler
        pump([(worker_sel, a)], lambda: bool(welcome.got))
        assert welcome.got == [(M, b"HI")]

        big = os.urandom(3 * 1024 * 1024)  # more than the pipe holds
        m.send(A, "big", big)
        assert m.stats()["queued_bytes"] > 0
        assert len(master_sel.get_map()) == 2  # the master now waits for a's pipe to be writable
        pump([(worker_sel, a), (master_sel, m)], lambda: len(welcome.got) == 2)
        assert welcome.got[1] == (M, big)
        assert m.stats()["queued_bytes"] == 0
        assert [key.fd for key in master_sel.get_map().values()] == [m.read_fd]  # no busy loop
