"""The worker table: which slots should serve, the worker process in each, and keeping it so.

Owns: forking a worker into a slot, the slot -> pid table (every change is announced to
every process), respawning a crashed worker with backoff, killing a worker that never
serves (a wedged boot), scaling (new slots from the free ones, QUIT to the highest), the
graceful retirement of a worker no longer wanted, and the rows `meteoritctl workers` shows.
Must not touch: the config (it reads the master's), the reload roll (reload.py decides
what replaces what and says so through `replace`), signals other than to its own workers,
the control socket.

A slot is a worker's place: its IPC pipe (made before fork, so there are
`server.max_workers` of them) and, with reuseport, its own listening sockets
(listeners.py). `wanted` are the slots that should serve; a crashed worker is respawned
into its slot, after a delay that doubles with each crash in a row.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from ..bus.ipc import MASTER_SLOT, Bus, Pipes
from ..config import Config
from ..errors import IpcError, MeteoritError
from ..scoreboard import Scoreboard
from ..worker.process import EXIT_BOOT_ERROR, Worker
from .listeners import Listeners

log = logging.getLogger("meteorit.master")

BACKOFF_BASE = 0.1  # seconds before the first respawn of a crashing slot, doubled per crash
BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that lived this long resets its slot's crash count
BOOT_DEADLINE = 60.0  # seconds a new worker has to serve before it is killed (and a roll given up)
KILL_GRACE = 5.0  # beyond graceful_timeout, before SIGKILL


@dataclass
class WorkerProcess:
    slot: int
    pid: int
    started: float
    version: str  # the config version it was forked with, then the last one it acknowledged
    ready: bool = False  # it sent `worker.ready`: it serves HTTP


class Owner(Protocol):
    """What the slots read of the master."""
    config: Config  # the running config, which new workers get
    redis_url: str
    pipes: Pipes | None
    bus: Bus | None
    scoreboard: Scoreboard | None

    def worker_must_close(self) -> list[int]:
        """The master's own descriptors, which no worker may keep."""


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def failed_to_boot(status: int) -> bool:
    """The worker said it cannot start at all (respawning it would only loop)."""
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_ERROR


def backoff(crashes: int) -> float:
    """Seconds before the respawn of a slot whose worker crashed `crashes` times in a row."""
    return min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (crashes - 1))


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Slots:
    def __init__(self, owner: Owner, listeners: Listeners, count: int,
                 blocked_signals: tuple[int, ...]) -> None:
        self.owner = owner
        self.listeners = listeners
        self.blocked_signals = blocked_signals  # the master's, blocked across fork
        self.wanted: set[int] = set(range(count))  # slots that should serve
        self.workers: dict[int, WorkerProcess] = {}  # slot -> its process
        self.restarts: Counter[int] = Counter()  # per slot
        self._crashes: dict[int, int] = {}  # per slot, in a row
        self._next_start: dict[int, float] = {}  # per slot: no respawn before
        self._retiring: set[int] = set()  # pids sent QUIT because unwanted: their exit is no crash

    @property
    def target(self) -> int:
        return len(self.wanted)

    def by_pid(self, pid: int | None) -> WorkerProcess | None:
        return next((w for w in self.workers.values() if w.pid == pid), None)

    # --- starting workers

    def spawn(self, slot: int) -> None:
        owner = self.owner
        assert owner.pipes is not None and owner.bus is not None
        sockets = self.listeners.of_slot(slot)
        assert owner.scoreboard is not None
        owner.scoreboard.clear(slot)  # the new worker counts from zero (the last one's were taken)
        worker = Worker(slot, owner.config, sockets, owner.redis_url, os.getpid(),
                        owner.pipes, owner.bus.table, owner.scoreboard,
                        close_fds=(*owner.worker_must_close(), *self.listeners.fds_besides(slot)))
        sys.stdout.flush()
        sys.stderr.flush()
        # Blocked across fork: a signal meant for the child before it has its own handlers
        # stays pending for them instead of landing in the master's handler copy.
        signal.pthread_sigmask(signal.SIG_BLOCK, self.blocked_signals)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.blocked_signals)
        if pid == 0:  # child: never returns into the master's code
            code = 1
            try:
                code = worker.run()
            except BaseException:
                log.exception("worker crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[slot] = WorkerProcess(slot, pid, time.monotonic(), owner.config.version)
        self._next_start.pop(slot, None)
        log.info("worker started", extra={"slot": slot, "worker_pid": pid})
        self.announce()

    def spawn_missing(self) -> None:
        now = time.monotonic()
        for slot in sorted(self.wanted):
            if slot not in self.workers and self._next_start.get(slot, 0.0) <= now:
                try:
                    self.spawn(slot)
                except MeteoritError as exc:  # e.g. its reuseport socket cannot be bound
                    log.error("cannot start worker %d: %s", slot, exc)
                    self._next_start[slot] = now + BACKOFF_MAX

    def start_waits(self, now: float) -> list[float]:
        """Seconds until each wanted, empty slot may be respawned."""
        return [t - now for slot, t in self._next_start.items() if slot not in self.workers and slot in self.wanted]

    def kill_wedged_boots(self) -> None:
        """A worker that does not serve within BOOT_DEADLINE is killed (and respawned with
        backoff): nothing that waits for workers to be ready may wait forever."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if not worker.ready and now - worker.started > BOOT_DEADLINE and worker.pid not in self._retiring:
                log.error("worker did not serve within %.0fs of its start; killing it", BOOT_DEADLINE,
                          extra={"slot": worker.slot, "worker_pid": worker.pid})
                worker.started = now  # one kill per deadline, while the reaper catches up
                kill(worker.pid, signal.SIGKILL)

    # --- which slots serve

    def free_slot(self) -> int | None:
        """A slot no process uses and none should: its pipe is quiet."""
        free = set(range(self.owner.config.server.max_workers)) - self.wanted - self.workers.keys()
        return min(free, default=None)

    def scale(self, count: int, keep: set[int]) -> str | None:
        """Serve with `count` workers: new ones in free slots, or QUIT to the highest ones
        but those in `keep`. Returns an error text, or None."""
        max_workers = self.owner.config.server.max_workers
        if not 1 <= count <= max_workers:
            return f"workers must be 1 to {max_workers} (server.max_workers)"
        while len(self.wanted) < count:
            slot = self.free_slot()
            if slot is None:
                return "no free slot: workers that are stopping still hold them; try again"
            self.wanted.add(slot)
        while len(self.wanted) > count:
            slot = max(self.wanted - keep)
            self.wanted.discard(slot)
            self._next_start.pop(slot, None)
            if slot in self.workers:
                self.retire(self.workers[slot])
            else:
                self.listeners.close_slot(slot)
        log.info("scaled to %d workers", count, extra={"slots": sorted(self.wanted)})
        return None

    def replace(self, old_slot: int, new_slot: int) -> None:
        """The worker of `new_slot` serves in place of `old_slot`'s, which retires."""
        self.wanted.discard(old_slot)
        self.wanted.add(new_slot)
        old = self.workers.get(old_slot)
        if old is not None:
            self.retire(old)

    def retire(self, worker: WorkerProcess) -> None:
        """Graceful stop of a worker that is no longer wanted; its exit is no crash."""
        self._retiring.add(worker.pid)
        kill(worker.pid, signal.SIGQUIT)
        # the kernel stops routing connections to the slot once its worker closes its copy too
        self.listeners.close_slot(worker.slot)

    # --- workers that exited (the master reaps them and decides which path)

    def pop(self, pid: int) -> WorkerProcess | None:
        """The exited worker `pid`, out of the table (announce() tells the others)."""
        worker = self.by_pid(pid)
        if worker is not None:
            del self.workers[worker.slot]
        return worker

    def was_retiring(self, pid: int) -> bool:
        """Whether `pid` was sent QUIT as unwanted; forgotten now that it exited."""
        retiring = pid in self._retiring
        self._retiring.discard(pid)
        return retiring

    def forget(self, worker: WorkerProcess, how: str) -> None:
        """An exit that needs no respawn (stopping, retired, or its slot is unwanted)."""
        log.info("worker %s", how, extra={"slot": worker.slot, "worker_pid": worker.pid})
        if worker.slot not in self.wanted:
            self.listeners.close_slot(worker.slot)

    def respawn_later(self, worker: WorkerProcess, how: str) -> None:
        """A crash: the slot is started again after a backoff that grows with the crashes in
        a row (a worker that lived STABLE_AFTER seconds starts the count again)."""
        self.restarts[worker.slot] += 1
        now = time.monotonic()
        crashes = 1 if now - worker.started > STABLE_AFTER else self._crashes.get(worker.slot, 0) + 1
        self._crashes[worker.slot] = crashes
        delay = backoff(crashes)
        self._next_start[worker.slot] = now + delay
        log.error("worker %s; respawning in %.1fs", how, delay,
                  extra={"slot": worker.slot, "worker_pid": worker.pid, "crashes": crashes})
        if self.listeners.reuseport and any(slot != worker.slot for slot in self.workers):
            # Out of the kernel's balancing group until the respawn, so new connections go to
            # the live workers instead of waiting in a backlog nobody accepts; the respawn
            # binds afresh. (Connections already queued there are reset.)
            self.listeners.close_slot(worker.slot)

    # --- what the workers say

    def mark_ready(self, pid: int | None, version: str) -> WorkerProcess | None:
        """`pid` serves HTTP on config `version`; None if it died since (the reaper has the rest)."""
        worker = self.by_pid(pid)
        if worker is not None:
            worker.ready = True
            worker.version = version
        return worker

    def set_version(self, pid: int, version: str) -> None:
        """`pid` acknowledged hot settings of config `version`."""
        worker = self.by_pid(pid)
        if worker is not None:
            worker.version = version

    # --- signals to every worker

    def signal_all(self, sig: int) -> None:
        for worker in self.workers.values():
            kill(worker.pid, sig)

    def kill_all(self) -> None:
        """At exit: SIGKILL to every worker, each waited for."""
        self.signal_all(signal.SIGKILL)
        for worker in list(self.workers.values()):
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
        self.workers.clear()

    def announce(self) -> None:
        """The master is the one authority on slot -> pid: every change goes to every worker."""
        bus = self.owner.bus
        if bus is None:
            return
        bus.set_table({MASTER_SLOT: os.getpid(), **{w.slot: w.pid for w in self.workers.values()}})
        try:
            bus.announce_table()
        except IpcError as exc:
            log.error("cannot announce the worker table: %s", exc)

    # --- views

    def serving_pids(self) -> set[int]:
        return {w.pid for w in self.workers.values() if w.ready and w.pid not in self._retiring}

    def all_ready(self) -> bool:
        """Every wanted worker runs and serves HTTP."""
        return len(self.workers) >= self.target and all(w.ready for w in self.workers.values())

    def settled(self, count: int) -> bool:
        """Exactly `count` workers run, all in wanted slots and serving."""
        serving = [w for slot, w in self.workers.items() if slot in self.wanted and w.ready]
        return len(serving) == count and len(self.workers) == count

    def booting(self) -> bool:
        """A wanted slot's worker does not serve yet."""
        return any(not w.ready for slot, w in self.workers.items() if slot in self.wanted)

    def stale(self, version: str) -> list[WorkerProcess]:
        """Wanted workers, not retiring, that run another config version than `version`."""
        return [w for slot, w in sorted(self.workers.items())
                if slot in self.wanted and w.version != version and w.pid not in self._retiring]

    def versions(self) -> Counter[str]:
        """How many wanted workers run each config version."""
        return Counter(w.version for slot, w in self.workers.items() if slot in self.wanted)

    def rows(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"slot": w.slot, "pid": w.pid, "uptime_seconds": round(now - w.started, 3),
                 "ready": w.ready, "version": w.version, "restarts": self.restarts[w.slot],
                 "state": "retiring" if w.pid in self._retiring else
                          "serving" if w.ready and w.slot in self.wanted else "starting"}
                for _slot, w in sorted(self.workers.items())]
