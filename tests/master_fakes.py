"""Fakes at the OS boundary for the master's unit tests (test_slots, test_reload,
test_commands): a clock, a recorder for the signals the master sends, a stand-in for the
master object (what Slots, Reload and Commands read of it and ask of it), and workers put
in slots without a fork. The bus is the real one, over real pipes nobody reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from meteorit import config as configlib
from meteorit.bus.ipc import MASTER_SLOT, Bus, Pipes
from meteorit.config import Config
from meteorit.master.slots import Slots, WorkerProcess

# Above any pid_max Linux allows (2**22): a signal that escaped the recorder finds no process.
FIRST_PID = 5_000_000


class Clock:
    """time.monotonic for the modules under test, moved on by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    path.write_text("".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
                            for name, table in sections.items()))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Config:
    """`sections` as the TOML file `path`, loaded the way the master loads it."""
    write_toml(path, sections)
    return configlib.load(str(path), env={})


class FakeMaster:
    """The master as its parts see it; what they tell it is kept in `told`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.redis_url = config.redis.url
        self.stopping = False
        self.pipes: Pipes | None = Pipes(config.server.max_workers)
        self.bus: Bus | None = Bus(self.pipes, MASTER_SLOT, os.getpid(), {})
        self.told: list[Any] = []
        self.board: dict[int, dict[str, Any]] = {}  # pid -> its scoreboard snapshot, as last_known gives it
        self.scoreboard = None  # Slots.spawn's, never called here (no fork)
        self.slots: Slots | None = None  # for scale(), once made

    def worker_must_close(self) -> list[int]:
        return []

    def adopt(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.redis_url = redis_url
        self.told.append(("adopt", config.version))

    def reload_began(self) -> None:
        self.told.append("began")

    def reload_ended(self, ok: bool) -> None:
        self.told.append(("ended", ok))

    def stop(self, graceful: bool) -> None:
        self.stopping = True
        self.told.append(("stop", graceful))

    def scale(self, count: int) -> str | None:
        assert self.slots is not None
        return self.slots.scale(count, keep=set())

    def snapshot(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "retired": {}, "retired_pids": []}

    def last_known(self, pids: list[int]) -> list[dict[str, Any]]:
        return [snapshot for pid, snapshot in self.board.items() if pid in pids]

    def close(self) -> None:
        if self.pipes is not None:
            for fd in self.pipes.all_fds():
                os.close(fd)


def place(slots: Slots, slot: int, *, version: str, ready: bool = True, started: float = 0.0) -> WorkerProcess:
    """A worker in `slot` as if forked `started` (clock time), on the bus table."""
    worker = WorkerProcess(slot, FIRST_PID + len(slots.workers) + 100 * slot, started, version, ready)
    while slots.by_pid(worker.pid) is not None:
        worker.pid += 1
    slots.workers[slot] = worker
    slots.announce()
    return worker


class FakeSpawn:
    """Slots.spawn without the fork: the slot gets a worker on the master's config, booting."""

    def __init__(self, slots: Slots, clock: Clock) -> None:
        self.slots = slots
        self.clock = clock
        self.spawned: list[int] = []

    def __call__(self, slot: int) -> None:
        self.spawned.append(slot)
        place(self.slots, slot, version=self.slots.owner.config.version, ready=False, started=self.clock.now)
