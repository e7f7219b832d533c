"""A worker process: one uvloop event loop serving HTTP on the shared listening sockets.

Owns: everything a worker does after fork: resetting the signals it inherited, building
its own loop (never the master's), the HTTP servers, the Redis writer, the once-a-second
tick (Date header, timeouts, orphan check, its counters onto the scoreboard) and its
graceful and fast stops.
Must not touch: forking (workers never fork), other workers, the master's state, other
slots' scoreboard segments (it unmaps them after fork).

The constructor runs in the master before fork and only stores its arguments.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import socket
import time

import msgpack
import orjson
import uvloop

from ..bus import ipc
from .. import metrics, privileges
from ..scoreboard import Scoreboard
from .. import log as logsetup
from .app import EventsApp
from ..config import Config
from ..errors import IpcError
from .exchange import ServerState
from .http import HttpProtocol
from ..bus.ipc import Bus, Pipes
from .ratelimit import REBALANCE
from .response import Clock
from .spool import Spool
from .writer import RedisWriter, open_writer

log = logging.getLogger("meteorit.worker")

EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # the master halts instead of respawning a worker that cannot boot

READY_ALERT = "worker.ready"  # to the master once serving; data: the config version
# Built-in alerts every worker answers:
PING_ALERT = "ping"  # any data; replies {"pid", "version"} as JSON
CONFIG_ALERT = "config.apply"  # msgpack of the settings; applies the hot ones, replies the version
STATS_ALERT = "stats.get"  # replies this worker's counters (msgpack)
RATE_ALERT = "rate.demand"  # broadcast by each worker: its per-key demand, for the rate shares
MASTER_STATS_ALERT = "master.stats"  # asked of the master (data: msgpack of the pids that did
# not answer a gather): its own counters, the exited workers' and those pids' last known
STATS_TIMEOUT = 0.5  # seconds /metrics waits for the workers' counters

TICK = 1.0  # seconds: Date header, timeout sweep, orphan check, counters onto the scoreboard
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
MASTER_SIGNALS = (signal.SIGCHLD, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT) + IGNORED_SIGNALS


class Worker:
    def __init__(self, slot: int, config: Config, sockets: list[socket.socket], redis_url: str,
                 master_pid: int, pipes: Pipes, table: dict[int, int], scoreboard: Scoreboard,
                 close_fds: tuple[int, ...] = ()) -> None:
        self.slot = slot
        self.config = config
        self.sockets = sockets
        self.redis_url = redis_url
        self.master_pid = master_pid
        self.close_fds = close_fds
        self.pipes = pipes
        self.table = dict(table)
        self.scoreboard = scoreboard  # our slot's segment: the master reads it if we die
        self.bus: Bus | None = None
        self.stopping = False
        self.stop_requested = False  # a stop signal that came during boot
        self.loop: asyncio.AbstractEventLoop | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.state: ServerState | None = None
        self.writer: RedisWriter | None = None
        self.app: EventsApp | None = None
        self.started = time.monotonic()

    def run(self) -> int:
        """The body of the child process; returns its exit code."""
        logsetup.set_role("worker", slot=self.slot)
        try:
            self._boot()
        except Exception as exc:
            log.exception("worker failed to boot: %s", exc)
            return EXIT_BOOT_ERROR
        assert self.loop is not None and self.writer is not None
        try:
            if self.stop_requested:
                log.info("stopped during boot")
                return EXIT_OK
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.writer.close())
            self.loop.close()
        self.publish_counters()  # final: the master adds them to the exited workers' totals
        log.info("worker exits", extra=self._totals())
        return EXIT_OK

    def publish_counters(self) -> bytes:
        """Our snapshot onto the scoreboard, where the master finds it even after a
        SIGKILL; returns it packed. A memory copy: it cannot block or fail on a full pipe."""
        packed = msgpack.packb(self.snapshot())
        if not self.scoreboard.write(self.slot, packed):
            log.error("counters of %d bytes do not fit the scoreboard; the master keeps older ones",
                      len(packed))
        return packed

    def _totals(self) -> dict[str, object]:
        """What this worker did, for its last log line (benchmarks and chaos tests read it)."""
        assert self.app is not None and self.writer is not None
        app = self.app
        return {"events_accepted": app.events_accepted,
                "requests": {str(k): v for k, v in sorted(app.statuses.items())},
                "redis_writes": self.writer.writes, "redis_write_errors": self.writer.write_errors,
                "events_spooled": self.writer.events_spooled, "events_replayed": self.writer.events_replayed}

    def _boot(self) -> None:
        self._reset_inherited_state()
        # before anything that serves a request: a root master's workers become server.user
        privileges.drop(privileges.resolve(self.config.server.user, self.config.server.group))
        self.loop = loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        cfg = self.config
        spool = Spool(cfg.spool.dir, cfg.spool.fsync, cfg.spool.max_bytes)
        spool.open()  # after the privilege drop: the file belongs to the worker's user
        self.writer = open_writer(cfg, self.redis_url, spool)
        self.app = EventsApp(cfg, self.writer, self._collect_stats)
        self.state = state = ServerState(self.app, cfg.limits, self.app.kept_headers)
        for sock in self.sockets:
            server = loop.run_until_complete(loop.create_server(
                lambda: HttpProtocol(state), sock=sock, backlog=cfg.server.backlog,
                start_serving=False))
            self.servers.append(server)
        self.pipes.keep_only_reader(self.slot)
        self.bus = Bus(self.pipes, self.slot, os.getpid(), self.table)
        self.bus.attach_loop(loop)
        ipc.install(self.bus)
        self._receive_builtin_alerts()
        for module in cfg.server.plugins:
            importlib.import_module(module)  # registers its own alert handlers (ipc.receive)
        loop.run_until_complete(self.writer.start())
        if self.stop_requested:
            return
        for server in self.servers:
            loop.run_until_complete(server.start_serving())
        loop.add_signal_handler(signal.SIGQUIT, self.handle_quit)
        loop.add_signal_handler(signal.SIGTERM, self.handle_term)
        loop.add_signal_handler(signal.SIGINT, self.handle_term)
        loop.add_signal_handler(signal.SIGUSR1, logsetup.reopen)  # the master reopened the file first
        if self.stop_requested:  # came between the last check and the loop's handlers
            self.handle_quit()
        loop.call_later(TICK, self._tick)
        self._share_rates()
        loop.call_later(REBALANCE, self._report_demand)
        gc.freeze()  # boot-time objects never need collecting: keep them out of every GC pass
        log.info("worker serving", extra={"redis_ready": self.writer.ready})
        self.bus.send(self.master_pid, READY_ALERT, self.config.version)  # a hot apply may have come

    def _reset_inherited_state(self) -> None:
        signal.set_wakeup_fd(-1)
        self.scoreboard.keep_only(self.slot)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, signal.SIG_IGN if sig in IGNORED_SIGNALS else signal.SIG_DFL)
        # Until boot is done a stop is only recorded: uvloop's own handlers lose a signal
        # that arrives between two run_until_complete calls.
        for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._signal_during_boot)
        # the master forked us with its signals blocked: pending ones arrive now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        for fd in self.close_fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # --- signals

    def _signal_during_boot(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def handle_quit(self) -> None:
        """Graceful stop: stop accepting, finish in-flight requests, flush, exit."""
        if not self.stopping:
            self.stopping = True
            log.info("graceful stop")
            assert self.loop is not None
            self.loop.create_task(self._graceful_stop())

    def handle_term(self) -> None:
        """Fast stop: close everything now; requests not yet answered get no 202. Events
        still in memory go to the spool before the loop stops, never dropped."""
        assert self.loop is not None and self.state is not None and self.writer is not None
        self.stopping = True
        log.info("fast stop")
        self._stop_accepting()
        for conn in list(self.state.connections):
            conn.transport.abort()
        self.loop.create_task(self.writer.spool_and_stop(self.loop.stop))

    async def _graceful_stop(self) -> None:
        assert self.loop is not None and self.state is not None and self.writer is not None
        deadline = self.loop.time() + self.config.server.graceful_timeout
        self._stop_accepting()
        state = self.state
        state.on_idle = asyncio.Event()
        for _ in range(2):
            # Connections uvloop accepted in its last burst reach connection_made now: they
            # are served (one request each, see HttpProtocol.last_request) before the drain.
            await asyncio.sleep(0)
        for conn in list(state.connections):
            if not conn.last_request:
                conn.shutdown()
        if state.connections:
            try:
                await asyncio.wait_for(state.on_idle.wait(), deadline - self.loop.time())
            except asyncio.TimeoutError:
                log.warning("%d connections still open at the graceful deadline", len(state.connections))
        await self.writer.drain(max(0.1, deadline - self.loop.time()))
        self.loop.stop()

    def _stop_accepting(self) -> None:
        assert self.state is not None
        self.state.stopping = True
        for server in self.servers:
            server.close()

    # --- built-in alerts

    def _receive_builtin_alerts(self) -> None:
        ipc.receive({PING_ALERT: self._on_ping, CONFIG_ALERT: self._on_config,
                     STATS_ALERT: self._on_stats, RATE_ALERT: self._on_demand})

    def _on_ping(self, data: bytes) -> None:
        ipc.reply("pong", orjson.dumps({"pid": os.getpid(), "version": self.config.version}))

    def _on_config(self, data: bytes) -> None:
        """A reload's hot settings, applied between two requests (this runs on the loop)."""
        assert self.app is not None and self.state is not None and self.writer is not None
        new = Config(values=msgpack.unpackb(data), path=self.config.path)
        self.app.reconfigure(new)
        self.state.kept_headers = self.app.kept_headers  # events.context may need more headers now
        self._share_rates()
        vars(self.state.limits).update(vars(new.limits))  # every connection reads this object
        self.writer.apply(new.redis.queue, new.redis.wait_replicas)
        logging.getLogger().setLevel(new.log.level.upper())
        self.config = new
        log.info("config applied", extra={"config_version": new.version})
        ipc.reply("config.applied", new.version)

    def _on_stats(self, data: bytes) -> None:
        # onto the scoreboard too: what the master reads of us after we die is never less
        # than what a scrape already counted
        ipc.reply("stats", self.publish_counters())

    def snapshot(self) -> metrics.Snapshot:
        assert self.app is not None and self.writer is not None and self.state is not None
        counters = self.app.counters
        for status, n in self.state.errors.items():  # answered by http.py: count them too
            counters.requests[status] += n
        self.state.errors.clear()
        return metrics.worker_snapshot(counters, self.writer.batch_sizes, {
            "pid": os.getpid(), "slot": self.slot, "version": self.config.version,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "connections": len(self.state.connections), "requests_abandoned": self.state.abandoned,
            "body_buffer_bytes": self.state.budget.held, "body_buffer_refused": self.state.budget.refused,
            "redis_writes": self.writer.writes, "redis_write_errors": self.writer.write_errors,
            "events_spooled": self.writer.events_spooled, "events_replayed": self.writer.events_replayed,
            "redis": self.writer.redis_state, "queue_length": self.writer.queue_length,
            "spool_bytes": self.writer.spool_bytes,
            "redis_waits_short": self.writer.waits_short, "redis_shards": self.writer.shard_counters(),
            "redis_topology": self.writer.topology()})

    async def _collect_stats(self) -> metrics.Snapshot:
        """Every worker's counters over the bus, then the master's, with the last known
        counters of the workers that did not answer: for /metrics and /v1/stats."""
        assert self.bus is not None
        expected = set(self.bus.worker_pids)
        replies = await self.bus.gather(STATS_ALERT, b"", STATS_TIMEOUT)
        missing = sorted(expected - replies.keys())
        try:
            master = msgpack.unpackb(await self.bus.request(
                self.master_pid, MASTER_STATS_ALERT, msgpack.packb(missing), STATS_TIMEOUT))
        except (asyncio.TimeoutError, IpcError):
            master = None
        last_known = master.pop("last_known", []) if master is not None else []
        workers = [msgpack.unpackb(data) for data in replies.values()]
        return metrics.stats_document(workers, missing, master, last_known)

    def _report_demand(self) -> None:
        assert self.app is not None and self.loop is not None and self.bus is not None
        rates = self.app.rates  # a reload may switch the limits on or off: keep the timer going
        if self.stopping:
            return
        if rates.enabled:
            try:
                self.bus.broadcast(RATE_ALERT, msgpack.packb([self.app.rates_tag, rates.take_report()]))
            except IpcError as exc:
                log.warning("rate demand not sent: %s", exc)
            rates.rebalance(os.getpid(), self.bus.worker_pids, time.monotonic())
        self.loop.call_later(REBALANCE, self._report_demand)

    def _on_demand(self, data: bytes) -> None:
        assert self.app is not None
        # Reports count only between workers with the same rates and keys: other settings may
        # differ during a rolling replacement, and the limit must hold through it too.
        tag, report = msgpack.unpackb(data, strict_map_key=False)
        if tag == self.app.rates_tag and ipc.sender is not None:
            self.app.rates.record(ipc.sender, report)

    def _share_rates(self) -> None:
        """New buckets start with an even share, not the whole rate, until reports come."""
        assert self.app is not None and self.bus is not None
        self.app.rates.rebalance(os.getpid(), self.bus.worker_pids, time.monotonic())

    def _tick(self) -> None:
        assert self.loop is not None and self.state is not None
        Clock.tick()
        self.state.check_timeouts()
        assert self.writer is not None
        self.writer.check_spools()  # replay our spool and orphans while Redis can take them
        self.publish_counters()
        if os.getppid() != self.master_pid and not self.stopping:
            log.error("master %d is gone; stopping", self.master_pid)
            self.handle_quit()
        self.loop.call_later(TICK, self._tick)

