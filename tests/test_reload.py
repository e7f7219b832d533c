"""Reload, the master's reload roll, without forking: the plan and its refusals, hot
settings and their acknowledgements, the one-by-one replacement, the rollback decisions
and the replies. Forks, signals and the clock are the fakes (master_fakes); real reloads
of a real master are test_control.py's, test_systemd.py's and test_reload_load.py's."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Iterator

import pytest

from master_fakes import Clock, FakeMaster, FakeSpawn, place, write_config, write_toml
from meteorit.master import reload as reload_module
from meteorit.master import slots as slots_module
from meteorit.master.listeners import Listeners
from meteorit.master.reload import HOT_APPLY_TIMEOUT, Reload, Roll
from meteorit.master.slots import Slots

BASE: dict[str, dict[str, Any]] = {"server": {"workers": 2, "max_workers": 4},
                                   "redis": {"url": "redis://127.0.0.1:1"}}


class Roller:
    """A master's slots and reload over a config file the tests rewrite."""

    def __init__(self, path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch,
                 sections: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.clock = clock
        self.master = FakeMaster(write_config(path, sections))
        self.listeners = Listeners(backlog=16, reuseport=True)
        self.slots = Slots(self.master, self.listeners, self.master.config.worker_count, ())
        self.master.slots = self.slots
        self.reload = Reload(self.master, self.slots, self.listeners)
        self.spawn = FakeSpawn(self.slots, clock)
        monkeypatch.setattr(self.slots, "spawn", self.spawn)
        self.replies: list[dict[str, Any]] = []
        self.first = self.master.config.version
        for slot in sorted(self.slots.wanted):
            place(self.slots, slot, version=self.first, started=clock.now)

    def rewrite(self, sections: dict[str, dict[str, Any]], valid: bool = True) -> str:
        """The file with `sections` over BASE; the version it will load as."""
        merged = {name: {**BASE.get(name, {}), **sections.get(name, {})} for name in {*BASE, *sections}}
        if not valid:
            write_toml(self.path, merged)
            return ""
        return write_config(self.path, merged).version

    def start(self) -> None:
        self.reload.start(self.replies.append)

    def serve(self, slot: int) -> None:
        worker = self.slots.workers[slot]
        self.slots.mark_ready(worker.pid, worker.version)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(slots_module, "time", clock)
    monkeypatch.setattr(reload_module, "time", clock)
    return clock


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(slots_module, "kill", lambda pid, sig: sent.append((pid, sig)))
    return sent


@pytest.fixture
def roller(tmp_path: Path, clock: Clock, kills: list[tuple[int, int]],
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Roller]:
    r = Roller(tmp_path / "meteorit.toml", clock, monkeypatch, BASE)
    yield r
    r.master.close()


def test_an_unchanged_config_is_answered_at_once(roller: Roller) -> None:
    roller.start()
    assert roller.replies == [{"ok": True, "version": roller.first, "mode": "none", "changed": [],
                               "workers_by_version": {roller.first: 2}}]
    assert roller.master.told == ["began", ("ended", True)] and not roller.reload.in_progress


@pytest.mark.parametrize(("sections", "error"), [
    ({"server": {"workers": -1}}, "server.workers: must be an integer >= 0, got -1"),
    ({"server": {"backlog": 16}}, "server.backlog: cannot change while meteorit runs; restart it to apply"),
    ({"nope": {}}, "nope: unknown section"),
])
def test_a_config_that_cannot_be_applied_is_refused_and_the_running_one_stays(
        roller: Roller, sections: dict[str, dict[str, Any]], error: str) -> None:
    roller.rewrite(sections, valid=False)
    roller.start()
    (reply,) = roller.replies
    assert reply["ok"] is False and reply["error"].startswith(error), reply
    assert reply["key"] == error.partition(":")[0] and reply["version"] == roller.first
    assert roller.master.config.version == roller.first and roller.reload.failures == 1
    assert roller.master.told == ["began", ("ended", False)] and roller.spawn.spawned == []


def test_hot_settings_are_answered_once_every_worker_acknowledged_them(roller: Roller) -> None:
    new = roller.rewrite({"limits": {"max_body": "2MiB"}})
    roller.start()
    assert roller.replies == [] and roller.reload.in_progress and roller.master.config.version == new
    state = roller.reload.state
    assert state is not None and roller.master.bus is not None
    waiter = roller.master.bus.waiters[state.hot_alert]
    assert roller.reload.hot_deadline() == roller.clock.now + HOT_APPLY_TIMEOUT
    roller.start()  # a second one meanwhile
    assert roller.replies == [{"ok": False, "error": "a reload is already in progress"}]
    for worker in list(roller.slots.workers.values()):
        waiter.add(worker.pid, new.encode())
    roller.reload.step()
    assert roller.replies[1:] == [{"ok": True, "version": new, "mode": "hot", "changed": ["limits.max_body"],
                                   "workers_by_version": {new: 2}}]
    assert roller.reload.reloads == 1 and roller.spawn.spawned == [] and roller.master.bus.waiters == {}
    assert roller.master.told == ["began", ("adopt", new), ("ended", True)]


def test_workers_that_do_not_acknowledge_in_time_are_replaced(roller: Roller) -> None:
    new = roller.rewrite({"limits": {"max_body": "2MiB"}})
    roller.start()
    roller.reload.step()
    assert roller.spawn.spawned == []  # still waiting for the acknowledgements
    roller.clock.advance(HOT_APPLY_TIMEOUT + 0.1)
    roller.reload.step()
    assert roller.reload.hot_deadline() is None and roller.reload.roll == Roll(old_slot=0, new_slot=2)
    assert roller.spawn.spawned == [2] and roller.slots.workers[2].version == new


def test_a_replacing_reload_rolls_one_worker_at_a_time(roller: Roller, kills: list[tuple[int, int]]) -> None:
    new = roller.rewrite({"redis": {"timeout": 4.0}})
    old = [roller.slots.workers[slot].pid for slot in (0, 1)]
    roller.start()
    roller.reload.step()
    assert roller.reload.roll == Roll(old_slot=0, new_slot=2) and roller.reload.busy_slots() == {0}
    roller.reload.step()
    assert roller.spawn.spawned == [2] and kills == []  # the old one serves until the new one does
    roller.serve(2)
    roller.reload.step()
    assert kills == [(old[0], signal.SIGQUIT)] and roller.slots.wanted == {1, 2}
    roller.reload.step()
    assert roller.reload.roll == Roll(old_slot=1, new_slot=3)  # slot 0 is still held by the retiring worker
    roller.serve(3)
    roller.reload.step()
    assert roller.replies == []
    roller.reload.step()
    assert roller.replies == [{"ok": True, "version": new, "mode": "replace", "changed": ["redis.timeout"],
                               "workers_by_version": {new: 2}}]
    assert roller.slots.wanted == {2, 3} and [pid for pid, _sig in kills] == old


def test_a_replacement_that_dies_before_serving_brings_the_previous_config_back(roller: Roller) -> None:
    new = roller.rewrite({"redis": {"timeout": 4.0}})
    roller.start()
    roller.reload.step()
    replacement = roller.slots.pop(roller.slots.workers[2].pid)
    assert replacement is not None
    assert not roller.reload.replacement_died(roller.slots.workers[1], "killed by SIGKILL")  # not the new one
    assert roller.reload.replacement_died(replacement, "exited with code 1")
    assert roller.replies == [{"ok": False, "version": roller.first, "error":
                               "reload rolled back: a new worker exited with code 1 before it served (see its log)"}]
    assert roller.master.told == ["began", ("adopt", new), ("adopt", roller.first), ("ended", False)]
    assert roller.reload.roll is None and roller.reload.failures == 1
    roller.reload.step()
    assert roller.spawn.spawned == [2]  # the old workers run the config again: nothing to replace


def test_a_boot_failure_rolls_back_only_a_worker_on_the_reloaded_config(roller: Roller,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert not roller.reload.roll_back_for(roller.slots.workers[0], "exited with code 3")  # no reload: the master stops
    roller.rewrite({"server": {"workers": 3}})
    roller.start()
    assert roller.slots.wanted == {0, 1, 2} and roller.replies == []  # scaled up, waiting for the new one
    roller.slots.spawn_missing()
    booting = roller.slots.pop(roller.slots.workers[2].pid)
    assert booting is not None
    assert not roller.reload.roll_back_for(roller.slots.workers[0], "exited with code 3")  # an old one
    assert roller.reload.roll_back_for(booting, "exited with code 3")
    assert roller.replies == [{"ok": False, "version": roller.first, "error":
                               "reload rolled back: a new worker exited with code 3 before it served (see its log)"}]
    assert roller.slots.target == 2 and roller.master.config.version == roller.first


def test_no_free_slot_gives_the_roll_up(tmp_path: Path, clock: Clock, kills: list[tuple[int, int]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    full = {"server": {"workers": 2, "max_workers": 2}, "redis": {"url": "redis://127.0.0.1:1"}}
    roller = Roller(tmp_path / "meteorit.toml", clock, monkeypatch, full)
    try:
        write_config(roller.path, {**full, "redis": {**full["redis"], "timeout": 4.0}})
        roller.start()
        roller.reload.step()
        assert roller.replies == [{"ok": False, "version": roller.first, "error": "reload rolled back: no free "
                                   "slot for a replacement worker (raise server.max_workers)"}]
        assert roller.spawn.spawned == [] and kills == []
    finally:
        roller.master.close()


def test_a_stop_ends_the_reload_unapplied_without_a_ready(roller: Roller) -> None:
    roller.rewrite({"limits": {"max_body": "2MiB"}})
    roller.start()
    roller.master.stopping = True
    roller.reload.cancel("meteorit is stopping")
    assert roller.replies == [{"ok": False, "error": "meteorit is stopping"}]
    assert ("ended", False) not in roller.master.told and not roller.reload.in_progress
    roller.reload.cancel("meteorit is stopping")  # none in progress: nothing more
    assert len(roller.replies) == 1


def test_a_scale_down_during_a_roll_keeps_the_slot_being_replaced(roller: Roller) -> None:
    roller.rewrite({"redis": {"timeout": 4.0}})
    roller.start()
    roller.reload.step()
    assert roller.slots.scale(1, keep=roller.reload.busy_slots()) is None
    assert roller.slots.wanted == {0}
