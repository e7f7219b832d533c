"""Commands, the master's side of meteoritctl, through a fake connection: argument checks
and their errors (which change nothing), the replies, and the requests that wait for the
workers or for a scale to settle, until answered or expired. The bus is real (pipes nobody
reads), the clock and signals are fakes; the real socket and CLI are test_control.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import pytest

from master_fakes import Clock, FakeMaster, place, write_config
from meteorit.master import commands as commands_module
from meteorit.master import slots as slots_module
from meteorit.master.commands import COMMANDS, MAX_WAIT, RESERVED_ALERTS, STATS_TIMEOUT, Commands
from meteorit.master.listeners import Listeners
from meteorit.master.slots import BOOT_DEADLINE, KILL_GRACE, Slots

V1 = "version-one"


class Connection:
    """What a command sees of control.Connection: respond() and fail(), recorded."""

    def __init__(self) -> None:
        self.replies: list[dict[str, Any]] = []

    def respond(self, reply: dict[str, Any]) -> None:
        self.replies.append(reply)

    def fail(self, error: str) -> None:
        self.respond({"ok": False, "error": error})


class Reload:
    def __init__(self) -> None:
        self.started: list[Callable[[dict[str, Any]], None]] = []

    def start(self, respond: Callable[[dict[str, Any]], None]) -> None:
        self.started.append(respond)


class Ctl:
    """The commands of a master with two serving workers."""

    def __init__(self, master: FakeMaster, clock: Clock) -> None:
        self.master = master
        self.clock = clock
        self.slots = Slots(master, Listeners(backlog=16, reuseport=True), master.config.worker_count, ())
        master.slots = self.slots
        self.reload = Reload()
        self.commands = Commands(master, self.slots, self.reload)  # type: ignore[arg-type]
        self.pids = [place(self.slots, slot, version=V1, started=clock.now).pid for slot in (0, 1)]
        assert master.bus is not None
        self.bus = master.bus
        self.announced = self.bus.sent  # the table alerts of the workers placed

    def alerts_sent(self) -> int:
        """Alerts sent to workers since the table was announced."""
        return self.bus.sent - self.announced

    def run(self, request: dict[str, Any]) -> Connection:
        conn = Connection()
        self.commands.handle(conn, request)  # type: ignore[arg-type]
        return conn

    def reply_from(self, pid: int, data: bytes) -> None:
        """`pid` answers the last alert the master sent."""
        (waiter,) = self.bus.waiters.values()
        waiter.add(pid, data)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(slots_module, "time", clock)
    monkeypatch.setattr(commands_module, "time", clock)
    return clock


@pytest.fixture
def ctl(tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctl]:
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(slots_module, "kill", lambda pid, sig: kills.append((pid, sig)))
    master = FakeMaster(write_config(tmp_path / "meteorit.toml", {
        "server": {"workers": 2, "max_workers": 4}, "redis": {"url": "redis://127.0.0.1:1"}}))
    yield Ctl(master, clock)
    master.close()


def test_an_unknown_command_is_named_with_the_known_ones(ctl: Ctl) -> None:
    assert ctl.run({"cmd": "restart"}).replies == [{"ok": False, "error": "unknown command 'restart'; known: "
                                                    "status, workers, stats, reload, broadcast, send, scale, stop"}]


def test_a_stopping_master_takes_only_stop(ctl: Ctl) -> None:
    ctl.master.stopping = True
    for cmd in COMMANDS:
        if cmd != "stop":
            assert ctl.run({"cmd": cmd}).replies == [{"ok": False, "error": "meteorit is stopping"}], cmd
    assert ctl.run({"cmd": "stop"}).replies == [{"ok": True, "stopping": "fast"}]
    assert ctl.reload.started == [] and ctl.alerts_sent() == 0


def test_stop_answers_first_then_stops(ctl: Ctl) -> None:
    assert ctl.run({"cmd": "stop", "graceful": True}).replies == [{"ok": True, "stopping": "graceful"}]
    assert ctl.master.told == [("stop", True)]


def test_reload_hands_the_reply_to_the_reload(ctl: Ctl) -> None:
    conn = ctl.run({"cmd": "reload"})
    (respond,) = ctl.reload.started
    assert conn.replies == []
    respond({"ok": True, "mode": "none"})
    assert conn.replies == [{"ok": True, "mode": "none"}]


def test_workers_lists_each_slot(ctl: Ctl) -> None:
    (reply,) = ctl.run({"cmd": "workers"}).replies
    assert reply["ok"] and [(w["slot"], w["pid"], w["state"]) for w in reply["workers"]] == [
        (0, ctl.pids[0], "serving"), (1, ctl.pids[1], "serving")]


@pytest.mark.parametrize(("request_", "error"), [
    ({"cmd": "send", "name": "ping"}, "send needs a pid (an integer)"),
    ({"cmd": "send", "pid": True, "name": "ping"}, "send needs a pid (an integer)"),
    ({"cmd": "send", "pid": "12", "name": "ping"}, "send needs a pid (an integer)"),
    ({"cmd": "send", "pid": 1, "name": "ping"}, "no process with pid 1 on the bus"),
    ({"cmd": "broadcast"}, "an alert needs a name"),
    ({"cmd": "broadcast", "name": ""}, "an alert needs a name"),
    ({"cmd": "broadcast", "name": 7}, "an alert needs a name"),
    ({"cmd": "broadcast", "name": "ping", "data": 5}, "alert data must be bytes or a string"),
    ({"cmd": "broadcast", "name": "ping", "wait": -1}, f"wait must be 0 to {MAX_WAIT:.0f} seconds"),
    ({"cmd": "broadcast", "name": "ping", "wait": MAX_WAIT + 1}, f"wait must be 0 to {MAX_WAIT:.0f} seconds"),
    ({"cmd": "broadcast", "name": "ping", "wait": True}, f"wait must be 0 to {MAX_WAIT:.0f} seconds"),
    ({"cmd": "broadcast", "name": "ping", "wait": "1"}, f"wait must be 0 to {MAX_WAIT:.0f} seconds"),
    ({"cmd": "scale"}, "scale needs a number of workers"),
    ({"cmd": "scale", "workers": "3"}, "scale needs a number of workers"),
    ({"cmd": "scale", "workers": True}, "scale needs a number of workers"),
    ({"cmd": "scale", "workers": 5}, "workers must be 1 to 4 (server.max_workers)"),
])
def test_bad_arguments_get_an_error_and_change_nothing(ctl: Ctl, request_: dict[str, Any], error: str) -> None:
    assert ctl.run(request_).replies == [{"ok": False, "error": error}]
    assert ctl.alerts_sent() == 0 and ctl.bus.waiters == {} and ctl.commands.deadlines() == []
    assert ctl.slots.wanted == {0, 1}


@pytest.mark.parametrize("name", sorted(RESERVED_ALERTS))
def test_built_in_alerts_are_refused(ctl: Ctl, name: str) -> None:
    assert ctl.run({"cmd": "broadcast", "name": name}).replies == [
        {"ok": False, "error": f"{name!r} is a built-in alert of meteorit's own processes"}]
    assert ctl.alerts_sent() == 0


def test_an_alert_without_wait_is_answered_with_its_addressees(ctl: Ctl) -> None:
    assert ctl.run({"cmd": "broadcast", "name": "ping"}).replies == [{"ok": True, "sent_to": ctl.pids}]
    assert ctl.run({"cmd": "send", "pid": ctl.pids[1], "name": "ping", "data": "x"}).replies == [
        {"ok": True, "sent_to": [ctl.pids[1]]}]
    assert ctl.alerts_sent() == 3  # two for the broadcast, one sent


def test_a_broadcast_with_wait_is_answered_when_every_worker_replied(ctl: Ctl) -> None:
    conn = ctl.run({"cmd": "broadcast", "name": "ping", "wait": 2})
    assert conn.replies == [] and ctl.commands.deadlines() == [ctl.clock.now + 2]
    ctl.reply_from(ctl.pids[1], b"pong 1")
    ctl.commands.answer_pending()
    assert conn.replies == []
    ctl.reply_from(ctl.pids[0], b"pong 0")
    ctl.commands.answer_pending()
    assert conn.replies == [{"ok": True, "sent_to": ctl.pids, "missing": [], "replies": [
        {"pid": ctl.pids[0], "data": b"pong 0"}, {"pid": ctl.pids[1], "data": b"pong 1"}]}]
    assert ctl.bus.waiters == {} and ctl.commands.deadlines() == []


def test_a_send_with_wait_names_the_silent_worker_at_its_deadline(ctl: Ctl) -> None:
    conn = ctl.run({"cmd": "send", "pid": ctl.pids[0], "name": "ping", "wait": 1.5})
    ctl.clock.advance(1.4)
    ctl.commands.answer_pending()
    assert conn.replies == []
    ctl.clock.advance(0.1)
    ctl.commands.answer_pending()
    assert conn.replies == [{"ok": True, "sent_to": [ctl.pids[0]], "missing": [ctl.pids[0]], "replies": []}]
    assert ctl.bus.waiters == {}


def test_status_adds_each_workers_requests_to_its_row(ctl: Ctl) -> None:
    conn = ctl.run({"cmd": "status"})
    (waiter,) = ctl.bus.waiters.values()
    assert waiter.expected == set(ctl.pids)
    ctl.reply_from(ctl.pids[0], msgpack.packb({"requests": {"202": 3, "400": 1}}))
    ctl.clock.advance(STATS_TIMEOUT)
    ctl.commands.answer_pending()
    (reply,) = conn.replies
    assert reply["ok"] and reply["master"] == ctl.master.snapshot() and reply["missing_workers"] == [ctl.pids[1]]
    assert [(row["pid"], row["requests"]) for row in reply["workers"]] == [(ctl.pids[0], 4), (ctl.pids[1], None)]


def test_stats_sum_the_workers_that_replied(ctl: Ctl) -> None:
    conn = ctl.run({"cmd": "stats"})
    for slot, pid in enumerate(ctl.pids):
        ctl.reply_from(pid, msgpack.packb({"pid": pid, "slot": slot, "events_accepted": 5 + slot}))
    ctl.commands.answer_pending()
    (reply,) = conn.replies
    assert reply["ok"] and reply["total"]["events_accepted"] == 11 and reply["missing_workers"] == []
    assert [w["pid"] for w in reply["workers"]] == ctl.pids


def test_stats_keep_the_last_known_counts_of_a_worker_that_did_not_reply(ctl: Ctl) -> None:
    """Its scoreboard snapshot stands in for it: the total does not go back."""
    ctl.master.board[ctl.pids[1]] = {"pid": ctl.pids[1], "slot": 1, "events_accepted": 7}
    conn = ctl.run({"cmd": "stats"})
    ctl.reply_from(ctl.pids[0], msgpack.packb({"pid": ctl.pids[0], "slot": 0, "events_accepted": 5}))
    ctl.clock.advance(STATS_TIMEOUT)
    ctl.commands.answer_pending()
    (reply,) = conn.replies
    assert reply["total"]["events_accepted"] == 12 and reply["missing_workers"] == [ctl.pids[1]]
    assert [w["pid"] for w in reply["workers"]] == [ctl.pids[0]]
    assert [w["pid"] for w in reply["stale_workers"]] == [ctl.pids[1]]


def test_scale_is_answered_once_the_workers_settled(ctl: Ctl) -> None:
    conn = ctl.run({"cmd": "scale", "workers": 3})
    assert conn.replies == [] and ctl.slots.wanted == {0, 1, 2}
    place(ctl.slots, 2, version=V1, ready=False)
    ctl.commands.answer_pending()
    assert conn.replies == []
    ctl.slots.mark_ready(ctl.slots.workers[2].pid, V1)
    ctl.commands.answer_pending()
    assert conn.replies == [{"ok": True, "workers": 3}]


def test_scale_that_does_not_settle_says_so_with_the_workers(ctl: Ctl) -> None:
    conn = ctl.run({"cmd": "scale", "workers": 1})
    settle = BOOT_DEADLINE + ctl.master.config.server.graceful_timeout + KILL_GRACE
    assert ctl.commands.deadlines() == [ctl.clock.now + settle]
    ctl.clock.advance(settle)
    ctl.commands.answer_pending()  # slot 1's worker never exited
    (reply,) = conn.replies
    assert reply["ok"] is False and reply["error"] == f"not settled at 1 workers in {settle:.0f}s"
    assert [(w["slot"], w["state"]) for w in reply["workers"]] == [(0, "serving"), (1, "retiring")]

