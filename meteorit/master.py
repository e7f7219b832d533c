"""The master process: binds, forks, supervises. It never does request work.

Owns: the listening sockets (bound before fork), the embedded redis-server when
configured, the worker slots and their processes, and the reaction to signals:

    TERM, INT   fast stop: workers close at once, then the master exits
    QUIT        graceful stop: workers stop accepting, finish in-flight requests, flush
                every pending event to Redis, exit; then the master exits 0
    TTIN, TTOU  one worker more / less
    HUP, USR1   logged (reload and log reopening come with the control socket)

Must not touch: HTTP, events, Redis writes. No event loop runs here: a selector over a
self-pipe (signal.set_wakeup_fd) is the whole loop, so forking is always safe.
Signal handlers only record the signal; the loop dispatches to `handle_<name>` and then
runs the same maintenance every turn: reap children, start missing workers.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from . import ipc, sock
from .config import Config
from .embedded import EmbeddedRedis
from .errors import IpcError, MeteoritError
from .ipc import MASTER_SLOT, Bus, Pipes
from .worker import EXIT_BOOT_ERROR, READY_ALERT, Worker

log = logging.getLogger("meteorit.master")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
FAST_STOP_TIMEOUT = 10.0  # seconds workers get after TERM before SIGKILL
KILL_GRACE = 5.0  # beyond graceful_timeout, before SIGKILL
BACKOFF_BASE = 0.1  # seconds before the first respawn of a crashing slot, doubled per crash
BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that lived this long resets its slot's crash count


@dataclass
class WorkerProcess:
    slot: int
    pid: int
    started: float
    ready: bool = False  # it sent `worker.ready`: it serves HTTP
    version: str = ""  # the config version it last acknowledged


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.target = config.worker_count
        self.sockets: list[socket.socket] = []  # slot 0's first ones: unix sockets are shared
        self.addresses: list[str] = []  # what each slot binds, with port 0 resolved
        self.listeners: dict[int, list[socket.socket]] = {}
        self.redis: EmbeddedRedis | None = None
        self.redis_url = config.redis.url
        self.workers: dict[int, WorkerProcess] = {}
        self.crashes: dict[int, int] = {}
        self.next_start: dict[int, float] = {}
        self.retiring: set[int] = set()  # pids sent QUIT by TTOU: their exit is no crash
        self.signals: deque[int] = deque()
        self.selector = selectors.DefaultSelector()
        self.pipes: Pipes | None = None
        self.bus: Bus | None = None
        self.wake_r, self.wake_w = -1, -1
        self.stopping = False
        self.kill_deadline = 0.0
        self.exit_code = 0

    def run(self) -> int:
        try:
            self._setup()
        except MeteoritError as exc:
            log.error("cannot start: %s", exc)
            self._teardown()
            return 1
        try:
            self._loop()
        finally:
            self._teardown()
        log.info("master exits", extra={"exit_code": self.exit_code})
        return self.exit_code

    # --- start and stop

    def _setup(self) -> None:
        cfg = self.config
        if not cfg.auth.keys:
            log.warning("AUTH IS OFF: auth.keys is empty, anyone who reaches the port can post events")
        self.sockets = sock.bind_all(cfg.server.listen, cfg.server.backlog, cfg.server.reuseport)
        self.listeners[0] = self.sockets
        self.addresses = [sock.describe(s) for s in self.sockets]  # port 0 resolved
        if cfg.embedded_redis:
            self.redis = EmbeddedRedis(cfg.redis.data_dir, cfg.redis.server_binary)
            self.redis.start()
            self.redis_url = self.redis.url
        self._install_signals()
        self.pipes = Pipes(cfg.server.max_workers)
        self.bus = Bus(self.pipes, MASTER_SLOT, os.getpid(), {})
        self.bus.attach_selector(self.selector)
        self.bus.receive(READY_ALERT, self._on_worker_ready)
        ipc.install(self.bus)
        log.info("meteorit starting", extra={
            "listen": self.addresses, "workers": self.target,
            "queue": cfg.redis.queue, "config_version": cfg.version})
        for slot in range(self.target):
            self.spawn(slot)

    def _install_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)

    def _record_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # nothing else here: the loop does the work

    def _teardown(self) -> None:
        for worker in self.workers.values():
            self._kill(worker.pid, signal.SIGKILL)
        for worker in list(self.workers.values()):
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
        self.workers.clear()
        if self.redis is not None:
            self.redis.stop()
        for s in self.sockets:
            if s.family == socket.AF_UNIX:
                try:
                    os.unlink(s.getsockname())
                except OSError:
                    pass
        for slot in list(self.listeners):
            self._close_listeners(slot)
        self.sockets = []

    # --- the loop

    def _loop(self) -> None:
        while True:
            for key, _events in self.selector.select(self._timeout()):
                self._dispatch_io(key.data)
            while self.signals:
                name = signal.Signals(self.signals.popleft()).name.lower()
                getattr(self, f"handle_{name[3:]}")()
            self.reap()
            if self.stopping:
                if not self.workers:
                    return
                if time.monotonic() > self.kill_deadline:
                    log.error("workers did not stop in time; killing %d", len(self.workers))
                    for worker in self.workers.values():
                        self._kill(worker.pid, signal.SIGKILL)
                    self.kill_deadline = float("inf")
            else:
                self._maintain_redis()
                self.spawn_missing()

    def _timeout(self) -> float:
        now = time.monotonic()
        waits = [t - now for slot, t in self.next_start.items()
                 if slot not in self.workers and slot < self.target]
        return max(0.01, min([1.0, *waits]))

    def _dispatch_io(self, tag: tuple[str, int | None] | None) -> None:
        if tag is None:
            self._drain_wakeups()
        elif self.bus is not None and tag[0] == "ipc-read":
            self.bus.on_readable()
        elif self.bus is not None and tag[0] == "ipc-write" and tag[1] is not None:
            self.bus.on_writable(tag[1])

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # --- signal handlers (run from the loop, never from the signal itself)

    def handle_term(self) -> None:
        self.stop(graceful=False)

    def handle_int(self) -> None:
        self.stop(graceful=False)

    def handle_quit(self) -> None:
        self.stop(graceful=True)

    def handle_hup(self) -> None:
        log.warning("HUP: live reload is not implemented yet; restart to apply a new config")

    def handle_usr1(self) -> None:
        log.info("USR1: logs go to stderr, nothing to reopen")

    def handle_ttin(self) -> None:
        if self.target >= self.config.server.max_workers:
            log.warning("TTIN: already %d workers, the server.max_workers limit", self.target)
            return
        self.target += 1
        log.info("TTIN: %d workers", self.target)

    def handle_ttou(self) -> None:
        if self.target <= 1:
            return
        self.target -= 1
        log.info("TTOU: %d workers", self.target)
        self.next_start.pop(self.target, None)
        worker = self.workers.get(self.target)
        if worker is not None:
            self.retiring.add(worker.pid)
            self._kill(worker.pid, signal.SIGQUIT)
        # the kernel stops routing connections to the slot once its worker closes its copy too
        self._close_listeners(self.target)

    def handle_chld(self) -> None:
        pass  # the loop reaps after every wake-up

    def stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return  # a second QUIT changes nothing; TERM after QUIT hurries the stop
        self.stopping = True
        timeout = self.config.server.graceful_timeout + KILL_GRACE if graceful else FAST_STOP_TIMEOUT
        self.kill_deadline = min(self.kill_deadline or float("inf"), time.monotonic() + timeout)
        log.info("%s stop of %d workers", "graceful" if graceful else "fast", len(self.workers))
        for worker in self.workers.values():
            self._kill(worker.pid, signal.SIGQUIT if graceful else signal.SIGTERM)

    # --- workers

    def spawn(self, slot: int) -> None:
        assert self.pipes is not None and self.bus is not None
        listeners = self._listeners_for(slot)
        others = {s.fileno() for socks in self.listeners.values() for s in socks} - {s.fileno() for s in listeners}
        worker = Worker(slot, self.config, listeners, self.redis_url, os.getpid(),
                        self.pipes, self.bus.table,
                        close_fds=(self.wake_r, self.wake_w, self.selector.fileno(), *others))
        sys.stdout.flush()
        sys.stderr.flush()
        # Blocked across fork: a signal meant for the child before it has its own handlers
        # stays pending for them instead of landing in the master's handler copy.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        if pid == 0:  # child: never returns into the master's code
            code = 1
            try:
                code = worker.run()
            except BaseException:
                log.exception("worker crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[slot] = WorkerProcess(slot, pid, time.monotonic())
        self.next_start.pop(slot, None)
        log.info("worker started", extra={"slot": slot, "worker_pid": pid})
        self._announce_table()

    def _listeners_for(self, slot: int) -> list[socket.socket]:
        """Slot 0's sockets, or with reuseport this slot's own TCP sockets on the same addresses."""
        if slot not in self.listeners:
            self.listeners[slot] = [
                s if s.family == socket.AF_UNIX or not self.config.server.reuseport
                else sock.bind(address, self.config.server.backlog, reuseport=True)
                for s, address in zip(self.sockets, self.addresses)]
        return self.listeners[slot]

    def _close_listeners(self, slot: int) -> None:
        shared = {id(s) for other, socks in self.listeners.items() if other != slot for s in socks}
        for s in self.listeners.pop(slot, []):
            if id(s) not in shared:
                s.close()

    def spawn_missing(self) -> None:
        now = time.monotonic()
        for slot in range(self.target):
            if slot not in self.workers and self.next_start.get(slot, 0.0) <= now:
                self.spawn(slot)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.redis is not None and pid == self.redis.pid:
                self.redis.reaped()
                log.error("embedded redis %s", describe_exit(status))
                continue
            worker = next((w for w in self.workers.values() if w.pid == pid), None)
            if worker is not None:
                del self.workers[worker.slot]
                self._worker_exited(worker, status)
                self._announce_table()

    def _worker_exited(self, worker: WorkerProcess, status: int) -> None:
        how = describe_exit(status)
        fields = {"slot": worker.slot, "worker_pid": worker.pid}
        retired = worker.pid in self.retiring
        self.retiring.discard(worker.pid)
        if self.stopping or retired or worker.slot >= self.target:
            log.info("worker %s", how, extra=fields)
            if worker.slot >= self.target:
                self._close_listeners(worker.slot)
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_ERROR:
            log.error("worker %d failed to boot (see its log line above); stopping meteorit",
                      worker.slot, extra=fields)
            self.exit_code = 1
            self.stop(graceful=False)
            return
        now = time.monotonic()
        crashes = 1 if now - worker.started > STABLE_AFTER else self.crashes.get(worker.slot, 0) + 1
        self.crashes[worker.slot] = crashes
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (crashes - 1))
        self.next_start[worker.slot] = now + delay
        log.error("worker %s; respawning in %.1fs", how, delay, extra={**fields, "crashes": crashes})
        if self.config.server.reuseport and any(slot != worker.slot for slot in self.workers):
            # Out of the kernel's balancing group until the respawn, so new connections go to
            # the live workers instead of waiting in a backlog nobody accepts; the respawn
            # binds afresh. (Connections already queued there are reset.)
            self._close_listeners(worker.slot)

    def _on_worker_ready(self, data: bytes) -> None:
        worker = self._worker_by_pid(ipc.sender)
        if worker is None:
            return  # it died since; the reaper has the rest
        worker.ready = True
        worker.version = data.decode(errors="replace")
        log.info("worker ready", extra={"slot": worker.slot, "worker_pid": worker.pid,
                                        "config_version": worker.version})

    def all_ready(self) -> bool:
        """Every wanted worker runs and serves HTTP."""
        return len(self.workers) >= self.target and all(w.ready for w in self.workers.values())

    def _worker_by_pid(self, pid: int | None) -> WorkerProcess | None:
        return next((w for w in self.workers.values() if w.pid == pid), None)

    def _announce_table(self) -> None:
        """The master is the one authority on slot -> pid: every change goes to every worker."""
        if self.bus is None:
            return
        self.bus.set_table({MASTER_SLOT: os.getpid(), **{w.slot: w.pid for w in self.workers.values()}})
        try:
            self.bus.announce_table()
        except IpcError as exc:
            log.error("cannot announce the worker table: %s", exc)

    def _maintain_redis(self) -> None:
        if self.redis is not None and self.redis.pid is None:
            log.warning("restarting embedded redis")
            try:
                self.redis.start()
            except MeteoritError as exc:
                log.error("embedded redis: %s", exc)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
