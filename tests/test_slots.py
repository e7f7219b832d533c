"""Slots, the master's worker table, without forking: backoff arithmetic, which slot a new
worker takes, scale planning, retirement, wedged boots, the table announced on the bus and
the rows meteoritctl shows. Forks and signals are the fakes (master_fakes); the real
processes are test_service.py's and test_control.py's."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator

import pytest

from master_fakes import Clock, FakeMaster, FakeSpawn, place, write_config
from meteorit.bus.ipc import MASTER_SLOT
from meteorit.errors import MeteoritError
from meteorit.master import slots as slots_module
from meteorit.master.listeners import Listeners
from meteorit.master.slots import (BACKOFF_MAX, BOOT_DEADLINE, STABLE_AFTER, Slots, backoff, describe_exit,
                                   failed_to_boot)
from meteorit.worker.process import EXIT_BOOT_ERROR

V1 = "version-one"
NO_WORKER = 1  # a pid no worker of the table has


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(slots_module, "time", clock)
    return clock


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(slots_module, "kill", lambda pid, sig: sent.append((pid, sig)))
    return sent


@pytest.fixture
def master(tmp_path: Path) -> Iterator[FakeMaster]:
    m = FakeMaster(write_config(tmp_path / "meteorit.toml", {
        "server": {"workers": 2, "max_workers": 4}, "redis": {"url": "redis://127.0.0.1:1"}}))
    yield m
    m.close()


@pytest.fixture
def slots(master: FakeMaster, clock: Clock, kills: list[tuple[int, int]]) -> Slots:
    s = Slots(master, Listeners(backlog=16, reuseport=True), master.config.worker_count, ())
    master.slots = s
    return s


def test_backoff_doubles_per_crash_in_a_row_up_to_its_cap() -> None:
    assert [backoff(n) for n in range(1, 9)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, BACKOFF_MAX])
    assert backoff(50) == BACKOFF_MAX


def test_an_exit_status_is_decoded_not_shifted() -> None:
    assert describe_exit(signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(EXIT_BOOT_ERROR << 8) == f"exited with code {EXIT_BOOT_ERROR}"
    assert failed_to_boot(EXIT_BOOT_ERROR << 8)
    assert not failed_to_boot(1 << 8) and not failed_to_boot(0) and not failed_to_boot(EXIT_BOOT_ERROR)


def test_crashes_in_a_row_wait_longer_and_a_stable_worker_starts_the_count_again(slots: Slots,
                                                                                clock: Clock) -> None:
    for crashes in range(1, 5):
        worker = place(slots, 0, version=V1, started=clock.now)
        slots.pop(worker.pid)
        slots.respawn_later(worker, "killed by SIGKILL")
        assert slots.start_waits(clock.now) == pytest.approx([backoff(crashes)])
    assert slots.restarts[0] == 4
    clock.advance(STABLE_AFTER + 1)
    worker = place(slots, 0, version=V1, started=clock.now - STABLE_AFTER - 1)
    slots.pop(worker.pid)
    slots.respawn_later(worker, "killed by SIGKILL")
    assert slots.start_waits(clock.now) == pytest.approx([backoff(1)])
    assert slots.restarts[0] == 5


def test_a_crashed_slot_is_respawned_only_after_its_backoff(slots: Slots, clock: Clock,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spawn = FakeSpawn(slots, clock)
    monkeypatch.setattr(slots, "spawn", spawn)
    slots.spawn_missing()
    assert spawn.spawned == [0, 1]
    crashed = slots.pop(slots.workers[1].pid)
    assert crashed is not None
    slots.respawn_later(crashed, "exited with code 1")
    slots.spawn_missing()
    assert spawn.spawned == [0, 1]  # 0.1 s to go
    clock.advance(backoff(1))
    slots.spawn_missing()
    assert spawn.spawned == [0, 1, 1]


def test_a_worker_that_cannot_be_started_is_tried_again_after_the_longest_backoff(
        slots: Slots, clock: Clock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(slot: int) -> None:
        raise MeteoritError("cannot listen on 127.0.0.1:1: Address already in use")
    monkeypatch.setattr(slots, "spawn", refuse)
    slots.spawn_missing()
    assert slots.start_waits(clock.now) == [BACKOFF_MAX, BACKOFF_MAX]
    assert "cannot start worker 0: cannot listen on 127.0.0.1:1: Address already in use" in caplog.messages


def test_a_new_slot_is_the_lowest_that_no_process_holds_and_none_wants(slots: Slots) -> None:
    place(slots, 0, version=V1)
    place(slots, 1, version=V1)
    assert slots.free_slot() == 2
    place(slots, 2, version=V1)  # e.g. retiring: out of `wanted`, its pipe still in use
    assert slots.free_slot() == 3
    slots.wanted.add(3)
    assert slots.free_slot() is None


def test_scale_up_takes_free_slots_and_scale_down_retires_the_highest_but_the_kept(
        slots: Slots, kills: list[tuple[int, int]]) -> None:
    for slot in (0, 1):
        place(slots, slot, version=V1)
    assert slots.scale(4, keep=set()) is None
    assert slots.wanted == {0, 1, 2, 3} and kills == []
    two, three = place(slots, 2, version=V1), place(slots, 3, version=V1)
    assert slots.scale(2, keep={3}) is None  # 3 is being replaced by a reload: it stays
    assert slots.wanted == {0, 3}
    assert kills == [(two.pid, signal.SIGQUIT), (slots.workers[1].pid, signal.SIGQUIT)]
    assert {row["slot"]: row["state"] for row in slots.rows()} == {
        0: "serving", 1: "retiring", 2: "retiring", 3: "serving"}
    assert three.pid in slots.serving_pids() and two.pid not in slots.serving_pids()


def test_a_scale_out_of_range_changes_nothing(slots: Slots) -> None:
    for count in (0, 5, -1):
        assert slots.scale(count, keep=set()) == "workers must be 1 to 4 (server.max_workers)"
    assert slots.wanted == {0, 1}


def test_slots_still_held_by_stopping_workers_are_not_free(slots: Slots) -> None:
    for slot in (0, 1):
        place(slots, slot, version=V1)
    assert slots.scale(4, keep=set()) is None
    for slot in (2, 3):
        place(slots, slot, version=V1)
    assert slots.scale(1, keep=set()) is None  # 1, 2 and 3 retire but still hold their slots
    assert slots.scale(2, keep=set()) == "no free slot: workers that are stopping still hold them; try again"


def test_a_retired_worker_exit_is_no_crash_and_is_forgotten(slots: Slots) -> None:
    worker = place(slots, 1, version=V1)
    slots.retire(worker)
    assert slots.pop(worker.pid) is worker and slots.by_pid(worker.pid) is None
    assert slots.was_retiring(worker.pid)
    assert not slots.was_retiring(worker.pid)  # once
    assert slots.restarts[1] == 0


def test_a_worker_that_never_serves_is_killed_once_per_deadline(slots: Slots, clock: Clock,
                                                               kills: list[tuple[int, int]]) -> None:
    wedged = place(slots, 0, version=V1, ready=False, started=clock.now)
    place(slots, 1, version=V1, ready=True, started=clock.now)
    retiring = place(slots, 2, version=V1, ready=False, started=clock.now)
    slots.retire(retiring)
    kills.clear()
    clock.advance(BOOT_DEADLINE)
    slots.kill_wedged_boots()
    assert kills == []  # not past it yet
    clock.advance(1)
    slots.kill_wedged_boots()
    slots.kill_wedged_boots()  # the reaper has not caught up: no second SIGKILL
    assert kills == [(wedged.pid, signal.SIGKILL)]


def test_every_change_of_the_table_reaches_the_bus(slots: Slots, master: FakeMaster) -> None:
    assert master.bus is not None
    zero, one = place(slots, 0, version=V1), place(slots, 1, version=V1)
    assert master.bus.table == {MASTER_SLOT: os.getpid(), 0: zero.pid, 1: one.pid}
    slots.pop(one.pid)
    slots.announce()
    assert master.bus.worker_pids == [zero.pid]


def test_ready_versions_and_settling(slots: Slots) -> None:
    zero = place(slots, 0, version=V1, ready=False)
    one = place(slots, 1, version=V1, ready=True)
    assert not slots.all_ready() and slots.booting() and not slots.settled(2)
    assert slots.mark_ready(zero.pid, "v2") is zero and zero.ready and zero.version == "v2"
    assert slots.mark_ready(NO_WORKER, "v2") is None
    assert slots.all_ready() and not slots.booting() and slots.settled(2) and not slots.settled(1)
    assert slots.versions() == {"v2": 1, V1: 1}
    assert slots.stale("v2") == [one]
    slots.set_version(one.pid, "v2")
    assert slots.stale("v2") == [] and slots.versions() == {"v2": 2}

