"""The master process: binds, forks, supervises. It never does request work.

Owns: the selector loop, the reaction to signals and the maintenance pass run at every
turn of the loop, the embedded redis-server when configured (embedded.py restarts it
without blocking the loop), the totals of workers that exited (read from each slot's
scoreboard segment when its worker is reaped, scoreboard.py), and the master's identity
(pid file, `server.user`, systemd notify). Signals:

    TERM, INT   fast stop: workers close at once, then the master exits
    QUIT        graceful stop: workers stop accepting, finish in-flight requests, flush
                every pending event to Redis, exit; then the master exits 0
    TTIN, TTOU  one worker more / less (`meteoritctl scale N` likewise)
    HUP         reload the config (`meteoritctl reload` likewise)
    USR1        reopen log.file, then have every worker reopen it (logrotate)

The rest it delegates, as gunicorn's arbiter does: the worker table to `Slots`
(slots.py), the reload roll to `Reload` (reload.py), `meteoritctl`'s commands to
`Commands` (commands.py; the socket itself is control.py), the listening sockets to
`Listeners` (listeners.py). Under systemd it takes activated sockets instead of binding
and tells systemd READY=1, RELOADING=1, STOPPING=1, STATUS= and WATCHDOG=1 (systemd.py);
started as root with `server.user`, its workers and the embedded Redis run as that user
(privileges.py).

Must not touch: HTTP, events, Redis writes. No event loop runs here: a selector over a
self-pipe (signal.set_wakeup_fd) is the whole loop, so forking is always safe.
Signal handlers only record the signal; the loop dispatches to `handle_<name>` and then
runs the same maintenance every turn: reap children, start missing workers, kill wedged
boots, take one step of a rolling replacement, answer control requests whose replies
came in, tell systemd.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from collections import deque
from typing import Any

import msgpack

from .. import log as logsetup
from .. import metrics, privileges
from ..bus import ipc
from ..bus.ipc import MASTER_SLOT, Bus, Pipes
from ..config import Config
from ..errors import MeteoritError
from ..scoreboard import Scoreboard
from ..worker.process import MASTER_STATS_ALERT, READY_ALERT, STATS_ALERT
from . import listeners, pidfile, systemd
from .commands import Commands
from .control import ControlServer
from .embedded import EmbeddedRedis
from .listeners import Listeners
from .reload import Reload
from .slots import KILL_GRACE, Slots, WorkerProcess, describe_exit, failed_to_boot

log = logging.getLogger("meteorit.master")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
FAST_STOP_TIMEOUT = 10.0  # seconds workers get after TERM before SIGKILL


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config  # the running one: a reload replaces it through adopt()
        self.redis: EmbeddedRedis | None = None
        self.redis_url = config.redis.url
        self.signals: deque[int] = deque()
        self.selector = selectors.DefaultSelector()
        self.pipes: Pipes | None = None
        self.bus: Bus | None = None
        self.scoreboard: Scoreboard | None = None  # each slot's counters, kept past its worker's death
        self.wake_r, self.wake_w = -1, -1
        self.stopping = False
        self.kill_deadline = 0.0
        self.exit_code = 0
        self.control: ControlServer | None = None
        self._events = 0  # selector events of the key being dispatched
        self.started = time.monotonic()
        self.retired: metrics.Snapshot = {}  # the summed last counters of workers that exited
        self.retired_pids: deque[int] = deque(maxlen=256)  # recent ones: a scrape may still see them
        self.notify = systemd.Notifier.from_env()  # every call a no-op without NOTIFY_SOCKET
        self.heartbeat = systemd.Heartbeat(self.notify, systemd.watchdog_interval(), STATS_ALERT)
        self.notified_ready = False
        self.identity: privileges.Identity | None = None  # server.user, for workers and redis
        self.pid_file: pidfile.PidFile | None = None
        self.listeners = Listeners(config.server.backlog, config.server.reuseport)
        self.slots = Slots(self, self.listeners, config.worker_count, HANDLED_SIGNALS)
        self.reload = Reload(self, self.slots, self.listeners)
        self.commands = Commands(self, self.slots, self.reload)

    @property
    def target(self) -> int:
        return self.slots.target

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
        if not cfg.auth.keys and not cfg.auth.public_keys:
            log.warning("AUTH IS OFF: auth.keys and auth.public_keys are empty, anyone who reaches "
                        "the port can post events")
        if cfg.server.reuseport and _sysctl("net/ipv4/tcp_migrate_req") == "0":
            log.warning("net.ipv4.tcp_migrate_req is 0: connections waiting to be accepted by a "
                        "worker that stops (scale down, TTOU, crash) are reset; set it to 1")
        self._prepare_identity(cfg)
        if not self._inherit_sockets():
            self.listeners.bind(cfg.server.listen)
        if cfg.embedded_redis:
            self.redis = EmbeddedRedis(cfg.redis.data_dir, cfg.redis.server_binary, owner=self.identity)
            self.redis.start()
            self.redis_url = self.redis.url
        self._install_signals()
        self.pipes = Pipes(cfg.server.max_workers)
        self.scoreboard = Scoreboard(cfg.server.max_workers)
        self.bus = Bus(self.pipes, MASTER_SLOT, os.getpid(), {})
        self.bus.attach_selector(self.selector)
        self.bus.receive({READY_ALERT: self._on_worker_ready, MASTER_STATS_ALERT: self._on_master_stats})
        ipc.install(self.bus)
        self.control = ControlServer(cfg.control.socket, cfg.control.group, self.selector,
                                     self.commands.handle)
        self.control.open()
        log.info("meteorit starting", extra={
            "listen": self.listeners.addresses, "workers": self.target,
            "queue": cfg.redis.queue, "config_version": cfg.version})
        for slot in sorted(self.slots.wanted):
            self.slots.spawn(slot)

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
        if self.control is not None:
            self.control.close()
        self.slots.kill_all()
        if self.redis is not None:
            self.redis.stop()
        self.listeners.close()
        if self.pid_file is not None:
            self.pid_file.remove()

    def worker_must_close(self) -> list[int]:
        """What a worker must not keep: the wake-up pipe and the selector, the control
        socket (it would accept meteoritctl), the embedded Redis' and the pid file's locks
        (a worker outliving the master would hold them against the next start), the notify
        socket (it would speak for us)."""
        fds = [self.wake_r, self.wake_w, self.selector.fileno(), *self.notify.fds()]
        if self.control is not None and self.control.sock is not None:
            fds.append(self.control.sock.fileno())
        if self.redis is not None:
            fds += self.redis.fds()
        if self.pid_file is not None and self.pid_file.fd is not None:
            fds.append(self.pid_file.fd)
        return [fd for fd in fds if fd >= 0]

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
                if not self.slots.workers:
                    return
                if time.monotonic() > self.kill_deadline:
                    log.error("workers did not stop in time; killing %d", len(self.slots.workers))
                    self.slots.signal_all(signal.SIGKILL)
                    self.kill_deadline = float("inf")
            else:
                self._maintain_redis()
                self.slots.spawn_missing()
                self.slots.kill_wedged_boots()
                self.reload.step()
            self.commands.answer_pending()
            self._tell_systemd()
            if self.control is not None:
                self.control.sweep(time.monotonic())

    def _timeout(self) -> float:
        now = time.monotonic()
        waits = self.slots.start_waits(now)
        waits += [deadline - now for deadline in self.commands.deadlines()]
        hot_deadline = self.reload.hot_deadline()
        if hot_deadline is not None:
            waits.append(hot_deadline - now)
        waits.append(self.heartbeat.timeout(now))
        if self.redis is not None and not self.stopping:
            waits.append(self.redis.wait(now))
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
        self.reload.start(lambda reply: None)

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
        self.slots.signal_all(signal.SIGUSR1)

    def handle_ttin(self) -> None:
        error = self.scale(self.target + 1)
        if error:
            log.warning("TTIN: %s", error)

    def handle_ttou(self) -> None:
        if self.target > 1:
            self.scale(self.target - 1)

    def handle_chld(self) -> None:
        pass  # the loop reaps after every wake-up

    # --- what the signals and the commands ask for

    def stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return  # a second QUIT changes nothing; TERM after QUIT hurries the stop
        self.stopping = True
        self.notify.stopping()
        self.reload.cancel("meteorit is stopping")
        timeout = self.config.server.graceful_timeout + KILL_GRACE if graceful else FAST_STOP_TIMEOUT
        self.kill_deadline = min(self.kill_deadline or float("inf"), time.monotonic() + timeout)
        log.info("%s stop of %d workers", "graceful" if graceful else "fast", len(self.slots.workers))
        self.slots.signal_all(signal.SIGQUIT if graceful else signal.SIGTERM)

    def scale(self, count: int) -> str | None:
        """Serve with `count` workers (the slot a roll is replacing stays). An error text, or None."""
        return self.slots.scale(count, keep=self.reload.busy_slots())

    def adopt(self, config: Config, redis_url: str) -> None:
        """The running config from now on (a reload's, or the previous one back)."""
        self.config = config
        self.redis_url = redis_url

    # --- children that exited

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
            worker = self.slots.pop(pid)
            if worker is not None:
                self._count_exited(worker)
                self._worker_exited(worker, status)
                self.slots.announce()

    def _worker_exited(self, worker: WorkerProcess, status: int) -> None:
        """Which path an exit takes: the end of a roll, no respawn, a stop, or a respawn."""
        how = describe_exit(status)
        retired = self.slots.was_retiring(worker.pid)
        if self.reload.replacement_died(worker, how):
            return
        if self.stopping or retired or worker.slot not in self.slots.wanted:
            self.slots.forget(worker, how)
            return
        if failed_to_boot(status) and not self.reload.roll_back_for(worker, how):
            log.error("worker %d failed to boot (see its log line above); stopping meteorit",
                      worker.slot, extra={"slot": worker.slot, "worker_pid": worker.pid})
            self.exit_code = 1
            self.stop(graceful=False)
            return
        self.slots.respawn_later(worker, how)

    # --- alerts from the workers

    def _on_worker_ready(self, data: bytes) -> None:
        worker = self.slots.mark_ready(ipc.sender, data.decode(errors="replace"))
        if worker is None:
            return  # it died since; the reaper has the rest
        self.reload.maybe_finish()
        log.info("worker ready", extra={"slot": worker.slot, "worker_pid": worker.pid,
                                        "config_version": worker.version})

    def _count_exited(self, worker: WorkerProcess) -> None:
        """What a worker that exited counted, from its slot of the scoreboard (written as it
        exited, or at most a second before a SIGKILL), goes to the exited workers' totals.
        Once: the exit is reaped once, and the slot is cleared before its next worker."""
        assert self.scoreboard is not None
        last = self._board_snapshot(worker.slot, worker.pid)
        self.scoreboard.clear(worker.slot)
        if last is not None:
            self.retired = metrics.add_exited(self.retired, last)
        self.retired_pids.append(worker.pid)

    def _board_snapshot(self, slot: int, pid: int) -> metrics.Snapshot | None:
        """The slot's snapshot on the scoreboard if worker `pid` wrote it."""
        assert self.scoreboard is not None
        packed = self.scoreboard.read(slot)
        if packed is None:
            return None  # it died before its first second
        try:
            snapshot = msgpack.unpackb(packed)
        except (ValueError, msgpack.UnpackException) as exc:  # checksummed: only a bug of ours
            log.error("scoreboard of slot %d does not decode: %s", slot, exc)
            return None
        return snapshot if isinstance(snapshot, dict) and snapshot.get("pid") == pid else None

    def last_known(self, pids: list[int]) -> list[metrics.Snapshot]:
        """The scoreboard snapshots of those `pids` that still run (workers that did not
        answer a gather in time): their counts stay in the totals."""
        found = []
        for pid in pids:
            worker = self.slots.by_pid(pid)
            snapshot = self._board_snapshot(worker.slot, pid) if worker is not None else None
            if snapshot is not None:
                found.append(snapshot)
        return found

    def _on_master_stats(self, data: bytes) -> None:
        try:
            missing = msgpack.unpackb(data) if data else []
        except (ValueError, msgpack.UnpackException):
            missing = []
        if not isinstance(missing, list):
            missing = []
        pids = [p for p in missing[:self.config.server.max_workers] if isinstance(p, int)]
        ipc.reply("master.stats", msgpack.packb({**self.snapshot(), "last_known": self.last_known(pids)}))

    def snapshot(self) -> dict[str, Any]:
        """The master's own counters, for status, stats and /metrics."""
        return {"pid": os.getpid(), "uptime_seconds": round(time.monotonic() - self.started, 3),
                "config_version": self.config.version, "config_path": self.config.path,
                "workers_wanted": self.target, "worker_restarts": sum(self.slots.restarts.values()),
                "reloads": self.reload.reloads, "reload_failures": self.reload.failures,
                "reloading": self.reload.in_progress,
                "embedded_redis": self.redis.describe() if self.redis is not None else None,
                "retired": self.retired, "retired_pids": list(self.retired_pids)}

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
        """Socket activation: systemd's listening sockets replace server.listen."""
        passed = systemd.listen_sockets()
        if not passed:
            return False
        self.listeners.adopt(passed)
        log.info("listening on the sockets systemd passed; server.listen is not used",
                 extra={"activated": {name: listeners.describe(s) for name, s in passed}})
        return True

    def _tell_systemd(self) -> None:
        """READY=1 once every worker serves; then WATCHDOG=1 and STATUS= (systemd.Heartbeat)."""
        ready = self.slots.serving_pids()
        if not self.notified_ready and not self.stopping and self.slots.all_ready():
            self.notified_ready = True
            self.notify.ready(f"{len(ready)}/{self.target} workers serving")
        if self.bus is not None:
            self.heartbeat.tick(time.monotonic(), self.bus, ready, self.target)

    def reload_began(self) -> None:
        if self.notified_ready:  # before the first READY=1 systemd is not told of reloads
            self.notify.reloading()

    def reload_ended(self, ok: bool) -> None:
        """What must follow every reload, applied or not (systemd's READY=1; none before
        the first READY=1, which waits for every worker to serve)."""
        if not self.notified_ready:
            return
        self.notify.ready(f"{'reloaded' if ok else 'reload failed, the running config stays'}; "
                          f"{self.target} workers, config {self.config.version}")

    def _maintain_redis(self) -> None:
        """A dead embedded Redis is started again without the loop waiting for it (see
        embedded.py); the workers spool until it answers."""
        if self.redis is not None:
            self.redis.supervise(time.monotonic())


def _sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return None
