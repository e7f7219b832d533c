"""The master process: binds, forks, supervises. It never does request work.

Owns: the listening sockets (bound before fork), the embedded redis-server when
configured, the worker slots and their processes, and the reaction to signals:

    TERM, INT   fast stop: workers close at once, then the master exits
    QUIT        graceful stop: workers stop accepting, finish in-flight requests, flush
                every pending event to Redis, exit; then the master exits 0
    TTIN, TTOU  one worker more / less (`meteoritctl scale N` likewise)
    HUP         reload the config (`meteoritctl reload` likewise)
    USR1        reopen log.file, then have every worker reopen it (logrotate)

and to `meteoritctl` on the control socket (see control.py and `cmd_<name>` below).
Under systemd it takes activated sockets instead of binding and tells systemd READY=1,
RELOADING=1, STOPPING=1, STATUS= and WATCHDOG=1 (systemd.py); started as root with
`server.user`, its workers and the embedded Redis run as that user (privileges.py).

Must not touch: HTTP, events, Redis writes. No event loop runs here: a selector over a
self-pipe (signal.set_wakeup_fd) is the whole loop, so forking is always safe.
Signal handlers only record the signal; the loop dispatches to `handle_<name>` and then
runs the same maintenance every turn: reap children, start missing workers, take one step
of a rolling replacement, answer control requests whose replies came in.

Slots: a slot is a worker's place: its IPC pipe (made before fork, so there are
`server.max_workers` of them) and, with reuseport, its own listening sockets. `self.slots`
are the slots that should serve; a crashed worker is respawned into its slot. A reload
that needs new workers replaces them one at a time: a new worker boots in a free slot, and
only once it serves is the old one sent QUIT and its slot given up. If the new one cannot
start, the old ones keep serving and the previous config is restored.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from .. import config as configlib
from ..bus import ipc
from .. import metrics, privileges
from . import pidfile, listeners, systemd
from .. import log as logsetup
from ..config import Config
from .control import Connection, ControlServer
from .embedded import EmbeddedRedis
from ..errors import ConfigError, IpcError, MeteoritError
from ..bus.ipc import MASTER_SLOT, Bus, Pipes
from ..worker.process import (CONFIG_ALERT, EXIT_BOOT_ERROR, MASTER_STATS_ALERT, RATE_ALERT, READY_ALERT,
                     STATS_ALERT, FINAL_ALERT, Worker)

log = logging.getLogger("meteorit.master")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
FAST_STOP_TIMEOUT = 10.0  # seconds workers get after TERM before SIGKILL
KILL_GRACE = 5.0  # beyond graceful_timeout, before SIGKILL
BACKOFF_BASE = 0.1  # seconds before the first respawn of a crashing slot, doubled per crash
BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that lived this long resets its slot's crash count
BOOT_DEADLINE = 60.0  # seconds a replacement worker has to serve before the roll is given up
HOT_APPLY_TIMEOUT = 5.0  # seconds workers have to acknowledge hot settings
STATS_TIMEOUT = 1.0  # seconds the control socket's status and stats wait for the workers
MAX_WAIT = 300.0  # most seconds a control request may ask to wait for replies
LISTEN_KEYS = ("server.listen",)
# sent by meteorit's processes to each other with meanings of their own: never from meteoritctl
RESERVED_ALERTS = frozenset({ipc.TABLE_ALERT, READY_ALERT, CONFIG_ALERT, RATE_ALERT, MASTER_STATS_ALERT})
COMMANDS = ("status", "workers", "stats", "reload", "broadcast", "send", "scale", "stop")


@dataclass
class WorkerProcess:
    slot: int
    pid: int
    started: float
    version: str  # the config version it was forked with, then the last one it acknowledged
    ready: bool = False  # it sent `worker.ready`: it serves HTTP


@dataclass
class Roll:
    """One step of a rolling replacement: `new_slot` boots while `old_slot` still serves."""
    old_slot: int
    new_slot: int


@dataclass
class Pending:
    """A control request waiting: `poll` returns the reply once it is ready, else None;
    at the deadline `expire` gives the reply instead."""
    poll: Callable[[], dict[str, Any] | None]
    expire: Callable[[], dict[str, Any]]
    deadline: float
    respond: Callable[[dict[str, Any]], None]
    alert_id: int = 0  # its IPC waiter, forgotten once answered


@dataclass
class ReloadState:
    """A reload in progress: what to restore if the new workers cannot start."""
    previous: Config
    plan: configlib.ReloadPlan
    waiting: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    previous_redis_url: str = ""
    previous_count: int = 0
    hot_waiter: ipc._Waiter | None = None
    hot_alert: int = 0
    hot_deadline: float = 0.0


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.slots: set[int] = set(range(config.worker_count))  # slots that should serve
        self.sockets: list[socket.socket] = []  # one per listen address; unix ones are shared
        self.addresses: list[str] = []  # what each slot binds, with port 0 resolved
        self.listen_of: dict[str, socket.socket] = {}  # configured address -> its socket
        # base sockets a slot already took (reuseport); the objects, not their id(): an id is
        # reused once a closed socket is freed, which made a fresh socket look taken
        self.claimed: set[socket.socket] = set()
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
        self.control: ControlServer | None = None
        self._events = 0  # selector events of the key being dispatched
        self.pending: list[Pending] = []
        self.roll: Roll | None = None
        self.reloading: ReloadState | None = None
        self.started = time.monotonic()
        self.restarts: Counter[int] = Counter()  # per slot
        self.reloads = 0
        self.reload_failures = 0
        self.retired: metrics.Snapshot = {}  # the summed final counters of workers that exited
        self.retired_pids: deque[int] = deque(maxlen=256)  # recent ones: a scrape may still see them
        self.notify = systemd.Notifier.from_env()  # every call a no-op without NOTIFY_SOCKET
        self.heartbeat = systemd.Heartbeat(self.notify, systemd.watchdog_interval(), STATS_ALERT)
        self.notified_ready = False
        self.activated = False  # listening sockets from systemd socket activation
        self.identity: privileges.Identity | None = None  # server.user, for workers and redis
        self.pid_file: pidfile.PidFile | None = None

    @property
    def target(self) -> int:
        return len(self.slots)

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
        if cfg.server.reuseport and _sysctl("net/ipv4/tcp_migrate_req") == "0":
            log.warning("net.ipv4.tcp_migrate_req is 0: connections waiting to be accepted by a "
                        "worker that stops (scale down, TTOU, crash) are reset; set it to 1")
        self._prepare_identity(cfg)
        if not self._inherit_sockets():
            self._bind(cfg)
        if cfg.embedded_redis:
            self.redis = EmbeddedRedis(cfg.redis.data_dir, cfg.redis.server_binary, owner=self.identity)
            self.redis.start()
            self.redis_url = self.redis.url
        self._install_signals()
        self.pipes = Pipes(cfg.server.max_workers)
        self.bus = Bus(self.pipes, MASTER_SLOT, os.getpid(), {})
        self.bus.attach_selector(self.selector)
        self.bus.receive({READY_ALERT: self._on_worker_ready, MASTER_STATS_ALERT: self._on_master_stats,
                          FINAL_ALERT: self._on_worker_final})
        ipc.install(self.bus)
        self.control = ControlServer(cfg.control.socket, cfg.control.group, self.selector,
                                     self.handle_control)
        self.control.open()
        log.info("meteorit starting", extra={
            "listen": self.addresses, "workers": self.target,
            "queue": cfg.redis.queue, "config_version": cfg.version})
        for slot in sorted(self.slots):
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

    def _bind(self, cfg: Config) -> None:
        """The listen addresses of `cfg`, keeping the open sockets of addresses bound already
        (a base socket closed with its crashed slot is bound afresh)."""
        keep = {a: s for a, s in self.listen_of.items() if a in cfg.server.listen and s.fileno() != -1}
        fresh = listeners.bind_all([a for a in cfg.server.listen if a not in keep],
                              cfg.server.backlog, cfg.server.reuseport)
        bound = iter(fresh)
        dropped = [s for a, s in self.listen_of.items() if a not in keep]
        self.listen_of = {a: keep[a] if a in keep else next(bound) for a in cfg.server.listen}
        self.sockets = list(self.listen_of.values())
        self.addresses = [listeners.describe(s) for s in self.sockets]  # port 0 resolved
        in_use = {id(s) for socks in self.listeners.values() for s in socks}
        for s in dropped:
            if id(s) not in in_use:
                s.close()  # no worker accepts on it: out of the kernel's group now

    def _teardown(self) -> None:
        if self.control is not None:
            self.control.close()
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
            if s.family == socket.AF_UNIX and not self.activated:  # systemd owns activated paths
                try:
                    os.unlink(s.getsockname())
                except OSError:
                    pass
        for slot in list(self.listeners):
            self._close_listeners(slot)
        for s in self.sockets:
            s.close()
        self.sockets = []
        if self.pid_file is not None:
            self.pid_file.remove()

    # --- the loop

    def _loop(self) -> None:
        while True:
            for key, events in self.selector.select(self._timeout()):
                self._events = events
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
                self._kill_wedged_boots()
                self._roll_step()
            self._answer_pending()
            self._tell_systemd()
            if self.control is not None:
                self.control.sweep(time.monotonic())

    def _timeout(self) -> float:
        now = time.monotonic()
        waits = [t - now for slot, t in self.next_start.items()
                 if slot not in self.workers and slot in self.slots]
        waits += [p.deadline - now for p in self.pending]
        if self.reloading is not None and self.reloading.hot_waiter is not None:
            waits.append(self.reloading.hot_deadline - now)
        waits.append(self.heartbeat.timeout(now))
        return max(0.01, min([1.0, *waits]))

    def _dispatch_io(self, tag: tuple[str, int | None] | None) -> None:
        if tag is None:
            self._drain_wakeups()
        elif self.bus is not None and tag[0] == "ipc-read":
            self.bus.on_readable()
        elif self.bus is not None and tag[0] == "ipc-write" and tag[1] is not None:
            self.bus.on_writable(tag[1])
        elif self.control is not None and tag[0] == "control":
            self.control.on_event(tag[1], self._events)

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
        log.info("HUP: reloading the config")
        self.reload(lambda reply: None)

    def handle_usr1(self) -> None:
        path = logsetup.reopen()
        if path is None:
            log.info("USR1: logs go to stderr, nothing to reopen")
            return
        try:
            privileges.give(self.identity, path)  # created by us as root: the workers reopen it next
        except MeteoritError as exc:
            log.error("USR1: %s", exc)
        log.info("USR1: log file reopened", extra={"log_file": path})
        for worker in self.workers.values():
            self._kill(worker.pid, signal.SIGUSR1)

    def handle_ttin(self) -> None:
        error = self.scale(self.target + 1)
        if error:
            log.warning("TTIN: %s", error)

    def handle_ttou(self) -> None:
        if self.target > 1:
            self.scale(self.target - 1)

    def handle_chld(self) -> None:
        pass  # the loop reaps after every wake-up

    def stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return  # a second QUIT changes nothing; TERM after QUIT hurries the stop
        self.stopping = True
        self.notify.stopping()
        if self.reloading is not None:
            self._finish_reload({"ok": False, "error": "meteorit is stopping"})
        timeout = self.config.server.graceful_timeout + KILL_GRACE if graceful else FAST_STOP_TIMEOUT
        self.kill_deadline = min(self.kill_deadline or float("inf"), time.monotonic() + timeout)
        log.info("%s stop of %d workers", "graceful" if graceful else "fast", len(self.workers))
        for worker in self.workers.values():
            self._kill(worker.pid, signal.SIGQUIT if graceful else signal.SIGTERM)

    # --- workers

    def spawn(self, slot: int) -> None:
        assert self.pipes is not None and self.bus is not None
        listeners = self._listeners_for(slot)
        others = ({s.fileno() for socks in self.listeners.values() for s in socks}
                  | {s.fileno() for s in self.sockets}) - {s.fileno() for s in listeners} - {-1}
        worker = Worker(slot, self.config, listeners, self.redis_url, os.getpid(),
                        self.pipes, self.bus.table,
                        close_fds=(self.wake_r, self.wake_w, self.selector.fileno(), *others,
                                   *self._master_only_fds()))
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
        self.workers[slot] = WorkerProcess(slot, pid, time.monotonic(), self.config.version)
        self.next_start.pop(slot, None)
        log.info("worker started", extra={"slot": slot, "worker_pid": pid})
        self._announce_table()

    def _master_only_fds(self) -> list[int]:
        """What a worker must not keep: the control socket (it would accept meteoritctl),
        the embedded Redis' and the pid file's locks (a worker outliving the master would
        hold them against the next start), the notify socket (it would speak for us)."""
        holders = [self.control.sock if self.control is not None else None,
                   getattr(self.redis, "_lock_fd", None), getattr(self.notify, "_sock", None),
                   getattr(self.pid_file, "fd", None)]
        fds = [h if isinstance(h, int) else h.fileno() for h in holders if h is not None]
        return [fd for fd in fds if fd >= 0]

    def _listeners_for(self, slot: int) -> list[socket.socket]:
        """The shared sockets, or with reuseport this slot's own TCP sockets on the same
        addresses: the first slot to ask takes the ones bound at start (or reload), so no
        socket in the kernel's group is left without a worker accepting on it."""
        if slot not in self.listeners:
            self.listeners[slot] = [self._listener(s, address) for s, address in zip(self.sockets, self.addresses)]
        return self.listeners[slot]

    def _listener(self, base: socket.socket, address: str) -> socket.socket:
        if base.family == socket.AF_UNIX or not self.config.server.reuseport or self.activated:
            return base
        if base not in self.claimed:
            self.claimed = {s for s in self.claimed if s.fileno() != -1}
            self.claimed.add(base)
            return base
        return listeners.bind(address, self.config.server.backlog, reuseport=True)

    def _close_listeners(self, slot: int) -> None:
        keep = {id(s) for other, socks in self.listeners.items() if other != slot for s in socks}
        keep |= {id(s) for s in self.sockets
                 if s.family == socket.AF_UNIX or not self.config.server.reuseport or self.activated}
        for s in self.listeners.pop(slot, []):
            if id(s) not in keep:
                s.close()

    def spawn_missing(self) -> None:
        now = time.monotonic()
        for slot in sorted(self.slots):
            if slot not in self.workers and self.next_start.get(slot, 0.0) <= now:
                try:
                    self.spawn(slot)
                except MeteoritError as exc:  # e.g. its reuseport socket cannot be bound
                    log.error("cannot start worker %d: %s", slot, exc)
                    self.next_start[slot] = now + BACKOFF_MAX

    def _kill_wedged_boots(self) -> None:
        """A worker that does not serve within BOOT_DEADLINE is killed (and respawned with
        backoff): nothing that waits for workers to be ready may wait forever."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if not worker.ready and now - worker.started > BOOT_DEADLINE and worker.pid not in self.retiring:
                log.error("worker did not serve within %.0fs of its start; killing it", BOOT_DEADLINE,
                          extra={"slot": worker.slot, "worker_pid": worker.pid})
                worker.started = now  # one kill per deadline, while the reaper catches up
                self._kill(worker.pid, signal.SIGKILL)

    def _free_slot(self) -> int | None:
        """A slot no process uses and none should: its pipe is quiet."""
        free = set(range(self.config.server.max_workers)) - self.slots - self.workers.keys()
        return min(free, default=None)

    def _retire(self, worker: WorkerProcess) -> None:
        """Graceful stop of a worker that is no longer wanted; its exit is no crash."""
        self.retiring.add(worker.pid)
        self._kill(worker.pid, signal.SIGQUIT)
        # the kernel stops routing connections to the slot once its worker closes its copy too
        self._close_listeners(worker.slot)

    def scale(self, count: int) -> str | None:
        """Serve with `count` workers: new ones in free slots, or QUIT to the highest ones.
        Returns an error text, or None."""
        if not 1 <= count <= self.config.server.max_workers:
            return f"workers must be 1 to {self.config.server.max_workers} (server.max_workers)"
        busy = {self.roll.old_slot} if self.roll is not None else set()
        while len(self.slots) < count:
            slot = self._free_slot()
            if slot is None:
                return "no free slot: workers that are stopping still hold them; try again"
            self.slots.add(slot)
        while len(self.slots) > count:
            slot = max(self.slots - busy)
            self.slots.discard(slot)
            self.next_start.pop(slot, None)
            if slot in self.workers:
                self._retire(self.workers[slot])
            else:
                self._close_listeners(slot)
        log.info("scaled to %d workers", count, extra={"slots": sorted(self.slots)})
        return None

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
            worker = self._worker_by_pid(pid)
            if worker is not None:
                del self.workers[worker.slot]
                self._worker_exited(worker, status)
                self._announce_table()

    def _worker_exited(self, worker: WorkerProcess, status: int) -> None:
        how = describe_exit(status)
        fields = {"slot": worker.slot, "worker_pid": worker.pid}
        retired = worker.pid in self.retiring
        self.retiring.discard(worker.pid)
        if self.roll is not None and worker.slot == self.roll.new_slot:
            log.error("replacement worker %s before it served; keeping the old workers", how, extra=fields)
            self._close_listeners(worker.slot)
            self._abort_roll(f"a new worker {how} before it served (see its log)")
            return
        if self.stopping or retired or worker.slot not in self.slots:
            log.info("worker %s", how, extra=fields)
            if worker.slot not in self.slots:
                self._close_listeners(worker.slot)
            return
        boot_error = os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_ERROR
        if boot_error and self.reloading is not None and worker.version == self.config.version:
            log.error("a worker on the reloaded config failed to boot; rolling back", extra=fields)
            self._abort_roll(f"a new worker {how} before it served (see its log)")
        elif boot_error:
            log.error("worker %d failed to boot (see its log line above); stopping meteorit",
                      worker.slot, extra=fields)
            self.exit_code = 1
            self.stop(graceful=False)
            return
        self.restarts[worker.slot] += 1
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

    # --- reload and rolling replacement

    def reload(self, respond: Callable[[dict[str, Any]], None]) -> None:
        """Read the config again and apply it; `respond` gets the outcome (now or later)."""
        if self.reloading is not None:
            log.warning("reload refused: a reload is already in progress")
            respond({"ok": False, "error": "a reload is already in progress"})
            return
        if self.notified_ready:  # before the first READY=1 systemd is not told of reloads
            self.notify.reloading()  # every outcome below ends in _reload_finished: READY=1
        try:
            new = configlib.reload(self.config)
            plan = configlib.reload_plan(self.config, new)
            if plan.replace and any(key in LISTEN_KEYS for key in plan.replace) and not self.activated:
                self._bind(new)
        except (ConfigError, MeteoritError, OSError) as exc:
            self.reload_failures += 1
            key, reason = (exc.key, exc.reason) if isinstance(exc, ConfigError) else ("server.listen", str(exc))
            log.error("reload refused, the running config stays: %s: %s", key, reason)
            self._reload_finished(False)
            respond({"ok": False, "error": f"{key}: {reason}", "key": key, "version": self.config.version})
            return
        if not plan.changed:
            self._reload_finished(True)
            respond(self._reload_reply(plan))
            return
        self.reloading = ReloadState(previous=self.config, plan=plan, waiting=[respond],
                                     previous_redis_url=self.redis_url, previous_count=self.target)
        self.config = new
        logging.getLogger().setLevel(new.log.level.upper())
        if not new.embedded_redis:
            self.redis_url = new.redis.url
        log.info("reloading", extra={"config_version": new.version, "changed": plan.changed,
                                     "mode": plan.mode})
        if not plan.replace:  # hot keys, or only the worker count: the workers stay
            self._apply_hot(new)
        if "server.workers" in plan.changed:  # else a count set by scale or TTIN/TTOU stays
            error = self.scale(new.worker_count)
            if error:
                log.error("reload: %s", error)
        self._maybe_finish_reload()

    def _apply_hot(self, new: Config) -> None:
        """Hot settings go to the running workers; each applies them and acknowledges."""
        assert self.bus is not None and self.reloading is not None
        try:
            alert_id = self.bus.broadcast(CONFIG_ALERT, msgpack.packb(new.values))
        except IpcError as exc:
            log.error("reload: hot settings not sent (%s); the workers will be replaced", exc)
            return
        self.reloading.hot_waiter = self.bus.expect(alert_id, set(self.bus.worker_pids))
        self.reloading.hot_deadline = time.monotonic() + HOT_APPLY_TIMEOUT
        self.reloading.hot_alert = alert_id

    def _check_hot_acks(self) -> None:
        state = self.reloading
        if state is None or state.hot_waiter is None:
            return
        waiter = state.hot_waiter
        for pid, version in waiter.replies.items():
            worker = self._worker_by_pid(pid)
            if worker is not None:
                worker.version = version.decode(errors="replace")
        if waiter.complete or time.monotonic() > state.hot_deadline:
            assert self.bus is not None
            self.bus.forget_waiter(state.hot_alert)
            if waiter.missing:
                log.warning("reload: workers %s did not acknowledge in time; they will be replaced",
                            waiter.missing)
            state.hot_waiter = None

    def _stale(self) -> list[WorkerProcess]:
        """Serving workers that run another config version than the master's."""
        return [w for slot, w in sorted(self.workers.items())
                if slot in self.slots and w.version != self.config.version and w.pid not in self.retiring]

    def _roll_step(self) -> None:
        self._check_hot_acks()
        if self.reloading is not None and self.reloading.hot_waiter is not None:
            return  # acknowledgements first: only workers that did not take them get replaced
        now = time.monotonic()
        roll = self.roll
        if roll is not None:
            new = self.workers.get(roll.new_slot)
            if new is not None and new.ready:
                self.slots.discard(roll.old_slot)
                self.slots.add(roll.new_slot)
                old = self.workers.get(roll.old_slot)
                if old is not None:
                    self._retire(old)
                self.roll = None
                log.info("worker replaced", extra={"old_slot": roll.old_slot, "slot": roll.new_slot})
            return  # a replacement that never serves is killed by _kill_wedged_boots: its exit aborts the roll
        stale = [w for w in self._stale() if w.ready]
        if not stale:
            self._maybe_finish_reload()
            return
        slot = self._free_slot()
        if slot is None:
            self._abort_roll("no free slot for a replacement worker (raise server.max_workers)")
            return
        self.roll = Roll(old_slot=stale[0].slot, new_slot=slot)
        self._hand_over_listeners(stale[0].slot, slot)
        try:
            self.spawn(slot)
        except MeteoritError as exc:
            self.roll = None
            self._abort_roll(f"cannot start a new worker: {exc}")

    def _hand_over_listeners(self, old_slot: int, new_slot: int) -> None:
        """With reuseport, the new worker accepts on the old one's sockets (when the
        addresses did not change): closing a socket resets the connections waiting in its
        accept queue, and a socket shared with the successor is never closed."""
        old = self.listeners.get(old_slot)
        if (self.config.server.reuseport and old
                and [listeners.describe(s) for s in old] == self.addresses):
            self.listeners[new_slot] = old

    def _abort_roll(self, reason: str) -> None:
        """The new config cannot run: the previous one comes back (workers already on the new
        one are replaced back by the same rolling steps)."""
        self.roll = None
        state = self.reloading
        if state is None:
            log.error("rolling replacement stopped: %s", reason)
            return
        self.reload_failures += 1
        self.config = state.previous
        self.redis_url = state.previous_redis_url
        if self.listen_of and list(self.listen_of) != self.config.server.listen and not self.activated:
            try:
                self._bind(self.config)
            except MeteoritError as exc:
                log.error("rollback: cannot listen on the previous addresses again: %s", exc)
        if self.target != state.previous_count:
            self.scale(state.previous_count)
        logging.getLogger().setLevel(self.config.log.level.upper())
        self._finish_reload({"ok": False, "error": f"reload rolled back: {reason}",
                             "version": self.config.version})

    def _maybe_finish_reload(self) -> None:
        state = self.reloading
        if state is None or state.hot_waiter is not None or self.roll is not None or self._stale():
            return
        if any(not w.ready for slot, w in self.workers.items() if slot in self.slots):
            return  # scaling up: the new ones are still booting
        self.reloads += 1
        self._finish_reload(self._reload_reply(state.plan))

    def _finish_reload(self, reply: dict[str, Any]) -> None:
        state, self.reloading = self.reloading, None
        if state is None:
            return
        if state.hot_waiter is not None and self.bus is not None:
            self.bus.forget_waiter(state.hot_alert)
        log.info("reload done" if reply.get("ok") else "reload failed", extra={
            "config_version": self.config.version, "error": reply.get("error")})
        if not self.stopping:  # no READY=1 after STOPPING=1
            self._reload_finished(bool(reply.get("ok")))
        for respond in state.waiting:
            respond(reply)

    def _reload_finished(self, ok: bool) -> None:
        """Hook for what must follow every reload, applied or not (systemd's READY=1; none
        before the first READY=1, which waits for every worker to serve)."""
        if not self.notified_ready:
            return
        self.notify.ready(f"{'reloaded' if ok else 'reload failed, the running config stays'}; "
                          f"{self.target} workers, config {self.config.version}")

    def _reload_reply(self, plan: configlib.ReloadPlan) -> dict[str, Any]:
        versions = Counter(w.version for slot, w in self.workers.items() if slot in self.slots)
        return {"ok": True, "version": self.config.version, "mode": plan.mode, "changed": plan.changed,
                "workers_by_version": dict(versions)}

    # --- the control socket: one `cmd_<name>` per meteoritctl command

    def handle_control(self, conn: Connection, request: dict[str, Any]) -> None:
        cmd = request["cmd"]
        if cmd not in COMMANDS:
            conn.fail(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
            return
        if self.stopping and cmd != "stop":
            conn.fail("meteorit is stopping")
            return
        getattr(self, f"cmd_{cmd}")(conn, request)

    def cmd_workers(self, conn: Connection, request: dict[str, Any]) -> None:
        conn.respond({"ok": True, "workers": self._worker_rows()})

    def cmd_status(self, conn: Connection, request: dict[str, Any]) -> None:
        def reply(replies: dict[int, bytes], missing: list[int]) -> dict[str, Any]:
            requests = {pid: sum(msgpack.unpackb(data)["requests"].values()) for pid, data in replies.items()}
            rows = self._worker_rows()
            for row in rows:
                row["requests"] = requests.get(row["pid"])
            return {"ok": True, "master": self._master_snapshot(), "workers": rows, "missing_workers": missing}
        self._gather(conn, STATS_ALERT, b"", STATS_TIMEOUT, None, reply)

    def cmd_stats(self, conn: Connection, request: dict[str, Any]) -> None:
        def reply(replies: dict[int, bytes], missing: list[int]) -> dict[str, Any]:
            workers = [msgpack.unpackb(data) for data in replies.values()]
            return {"ok": True, **metrics.stats_document(workers, missing, self._master_snapshot())}
        self._gather(conn, STATS_ALERT, b"", STATS_TIMEOUT, None, reply)

    def cmd_reload(self, conn: Connection, request: dict[str, Any]) -> None:
        self.reload(conn.respond)

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
        error = self.scale(count)
        if error:
            conn.fail(error)
            return

        def settled() -> dict[str, Any] | None:
            serving = [w for slot, w in self.workers.items() if slot in self.slots and w.ready]
            if len(serving) == count and len(self.workers) == count:
                return {"ok": True, "workers": count}
            return None

        def expire() -> dict[str, Any]:
            return {"ok": False, "error": f"not settled at {count} workers in {settle:.0f}s",
                    "workers": self._worker_rows()}
        settle = BOOT_DEADLINE + self.config.server.graceful_timeout + KILL_GRACE  # boots and QUITs
        self._wait(conn, settled, expire, settle)

    def cmd_stop(self, conn: Connection, request: dict[str, Any]) -> None:
        graceful = bool(request.get("graceful", False))
        conn.respond({"ok": True, "stopping": "graceful" if graceful else "fast"})
        self.stop(graceful=graceful)

    def _alert(self, conn: Connection, request: dict[str, Any], pid: int | None) -> None:
        """broadcast (pid None) or send; with `wait`, the replies of the workers."""
        assert self.bus is not None
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
        targets = [pid] if pid is not None else self.bus.worker_pids
        if not wait:
            try:
                self.bus.send(pid, name, data) if pid is not None else self.bus.broadcast(name, data)
            except IpcError as exc:
                conn.fail(str(exc))
                return
            conn.respond({"ok": True, "sent_to": targets})
            return

        def reply(replies: dict[int, bytes], missing: list[int]) -> dict[str, Any]:
            return {"ok": True, "sent_to": targets, "missing": missing,
                    "replies": [{"pid": p, "data": d} for p, d in sorted(replies.items())]}
        self._gather(conn, name, data, float(wait), pid, reply)

    def _gather(self, conn: Connection, name: str, data: bytes | str, timeout: float, pid: int | None,
                reply: Callable[[dict[int, bytes], list[int]], dict[str, Any]]) -> None:
        """Send to `pid` (or broadcast), then answer `conn` with `reply(replies, missing)` once
        every addressee answered or at the timeout."""
        assert self.bus is not None
        try:
            if pid is not None:
                alert_id = self.bus.send(pid, name, data)
                waiter = self.bus.expect(alert_id, {pid})
            else:
                expected = set(self.bus.worker_pids)
                alert_id = self.bus.broadcast(name, data)
                waiter = self.bus.expect(alert_id, expected)
        except IpcError as exc:
            conn.fail(str(exc))
            return
        self._wait(conn, lambda: reply(waiter.replies, []) if waiter.complete else None,
                   lambda: reply(waiter.replies, waiter.missing), timeout, alert_id)

    def _wait(self, conn: Connection, poll: Callable[[], dict[str, Any] | None],
              expire: Callable[[], dict[str, Any]], timeout: float, alert_id: int = 0) -> None:
        pending = Pending(poll, expire, time.monotonic() + timeout, conn.respond, alert_id)
        self.pending.append(pending)
        self._answer_pending()

    def _answer_pending(self) -> None:
        now = time.monotonic()
        for pending in list(self.pending):
            reply = pending.poll()
            if reply is None and now >= pending.deadline:
                reply = pending.expire()
            if reply is not None:
                self.pending.remove(pending)
                if pending.alert_id and self.bus is not None:
                    self.bus.forget_waiter(pending.alert_id)
                pending.respond(reply)

    def _worker_rows(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"slot": w.slot, "pid": w.pid, "uptime_seconds": round(now - w.started, 3),
                 "ready": w.ready, "version": w.version, "restarts": self.restarts[w.slot],
                 "state": "retiring" if w.pid in self.retiring else
                          "serving" if w.ready and w.slot in self.slots else "starting"}
                for _slot, w in sorted(self.workers.items())]

    def _master_snapshot(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "uptime_seconds": round(time.monotonic() - self.started, 3),
                "config_version": self.config.version, "config_path": self.config.path,
                "workers_wanted": self.target, "worker_restarts": sum(self.restarts.values()),
                "reloads": self.reloads, "reload_failures": self.reload_failures,
                "reloading": self.reloading is not None,
                "retired": self.retired, "retired_pids": list(self.retired_pids)}

    def _on_worker_final(self, data: bytes) -> None:
        try:
            snapshot = msgpack.unpackb(data)
        except Exception as exc:
            log.error("final counters of pid %s do not decode: %s", ipc.sender, exc)
            return
        self.retired = metrics.total([self.retired, snapshot])
        if ipc.sender is not None:
            self.retired_pids.append(ipc.sender)

    def _on_master_stats(self, data: bytes) -> None:
        ipc.reply("master.stats", msgpack.packb(self._master_snapshot()))

    def _on_worker_ready(self, data: bytes) -> None:
        worker = self._worker_by_pid(ipc.sender)
        if worker is None:
            return  # it died since; the reaper has the rest
        worker.ready = True
        worker.version = data.decode(errors="replace")
        self._maybe_finish_reload()
        log.info("worker ready", extra={"slot": worker.slot, "worker_pid": worker.pid,
                                        "config_version": worker.version})

    # --- systemd, pid file, user (see systemd.py, pidfile.py, privileges.py)

    def _prepare_identity(self, cfg: Config) -> None:
        """Before binding: the pid file (a second master stops here, even with reuseport
        on the same port), and the user the workers will run as."""
        self.identity = privileges.resolve(cfg.server.user, cfg.server.group)
        privileges.warn_if_useless(self.identity)
        if cfg.server.pid_file:
            self.pid_file = pidfile.PidFile(cfg.server.pid_file)
            self.pid_file.create(os.getpid())
        privileges.give(self.identity, cfg.log.file)  # so that workers can reopen it on USR1
        privileges.prepare_dir(self.identity, cfg.spool.dir)  # the workers' spool files

    def _inherit_sockets(self) -> bool:
        """Socket activation: systemd's listening sockets replace server.listen; every
        slot shares them (a reuseport group cannot be grown from sockets we did not bind)."""
        passed = systemd.listen_sockets()
        if not passed:
            return False
        self.activated = True
        self.sockets = [s for _name, s in passed]
        self.addresses = [listeners.describe(s) for s in self.sockets]
        self.listen_of = dict(zip(self.addresses, self.sockets))
        log.info("listening on the sockets systemd passed; server.listen is not used",
                 extra={"activated": {name: listeners.describe(s) for name, s in passed}})
        return True

    def _tell_systemd(self) -> None:
        """READY=1 once every worker serves; then WATCHDOG=1 and STATUS= (systemd.Heartbeat)."""
        ready = {w.pid for w in self.workers.values() if w.ready and w.pid not in self.retiring}
        if not self.notified_ready and not self.stopping and self.all_ready():
            self.notified_ready = True
            self.notify.ready(f"{len(ready)}/{self.target} workers serving")
        if self.bus is not None:
            self.heartbeat.tick(time.monotonic(), self.bus, ready, self.target)

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


def _sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return None
