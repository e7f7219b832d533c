"""systemd integration: the notify protocol against a real AF_UNIX datagram socket bound
by the test, socket activation through fd 3, and the unit files checked by
systemd-analyze. The master is the real one, with real workers and a real redis-server."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis as redislib

from conftest import METEORIT, READY_TIMEOUT, Meteorit, RedisServer, free_port, wait_until
from meteorit.master import systemd
from meteorit.errors import MeteoritError

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "meteorit:events"


class NotifySocket:
    """What systemd would hear: every datagram sent to NOTIFY_SOCKET, with its arrival time."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it: a path or @abstract
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout: float) -> None:
        """Take every datagram that arrives within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, timeout: float = READY_TIMEOUT, after: float = 0.0) -> tuple[float, dict[str, str]]:
        """The first message with `key` that arrived after `after`, waiting for it if needed."""
        deadline = time.monotonic() + timeout
        while True:
            for when, fields in self.messages:
                if when > after and key in fields:
                    return when, fields
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key} within {timeout}s; heard {[m for _, m in self.messages]}")
            self.receive(0.05)

    def times(self, key: str, since: float, until: float = float("inf")) -> list[float]:
        return [when for when, fields in self.messages if key in fields and since < when <= until]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    with tempfile.TemporaryDirectory(prefix="mn-") as short:  # sun_path holds 108 bytes
        listener = NotifySocket(os.path.join(short, "notify"))
        try:
            yield listener
        finally:
            listener.close()


# --- units: no processes


def test_a_notifier_without_notify_socket_sends_nothing() -> None:
    env: dict[str, str] = {}
    notifier = systemd.Notifier.from_env(env)
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    notifier.ready()
    notifier.watchdog()


def test_notify_socket_leaves_the_environment_and_abstract_names_work() -> None:
    listener = NotifySocket(f"@meteorit-test-{os.getpid()}")
    try:
        env = {"NOTIFY_SOCKET": listener.address, "OTHER": "x"}
        notifier = systemd.Notifier.from_env(env)
        assert env == {"OTHER": "x"}  # no child of the master may speak for it
        notifier.ready("2/2 workers serving")
        notifier.reloading()
        notifier.stopping()
        listener.receive(0.2)
        got = [fields for _, fields in listener.messages]
        assert got[0] == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "2/2 workers serving"}
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert got[1]["RELOADING"] == "1" and 0 <= now - int(got[1]["MONOTONIC_USEC"]) < 1_000_000
        assert got[2] == {"STOPPING": "1"}
        (fd,) = notifier.fds()  # what the master's workers close after fork
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        notifier.close()
        assert notifier.fds() == []
    finally:
        listener.close()


def test_a_vanished_notify_socket_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "meteorit.systemd")
    notifier = systemd.Notifier(str(tmp_path / "gone"))
    assert notifier.send("WATCHDOG=1") is False
    assert notifier.send("WATCHDOG=1") is False  # once loud, then quiet
    assert [r.levelname for r in caplog.records if "notify failed" in r.message] == ["WARNING", "DEBUG"]
    notifier.close()
    with pytest.raises(MeteoritError):
        systemd.Notifier("relative/path")


def test_a_state_change_systemd_had_no_room_for_is_sent_again_in_order(tmp_path: Path) -> None:
    """A busy systemd (its queue full: EAGAIN) must still get READY=1: a lost one leaves the
    unit activating, or reloading, until its timeout."""
    listener = NotifySocket(str(tmp_path / "notify"))
    notifier = systemd.Notifier(listener.address)
    heartbeat = systemd.Heartbeat(notifier, None, "stats.get")
    heartbeat.next_beat = time.monotonic() + 60  # no probe due: a loop turn alone must resend
    try:
        while notifier.send("STATUS=filler"):
            pass  # until the receiver's queue is full
        assert notifier.reloading() is False and notifier.ready("reloaded") is False
        assert notifier.send("STATUS=later") is False  # not before the state changes it follows
        assert heartbeat.timeout(time.monotonic()) <= systemd.RETRY_DELAY  # the loop comes back soon
        listener.receive(0.2)  # systemd catches up
        heartbeat.tick(time.monotonic(), bus=None, ready_pids=set(), wanted=0)  # type: ignore[arg-type]
        assert not notifier.pending
        listener.receive(0.2)
        after = [f for _, f in listener.messages if f.get("STATUS") != "filler"]
        assert [next(iter(f)) for f in after][:2] == ["RELOADING", "READY"], after
        assert after[1]["STATUS"] == "reloaded"
    finally:
        notifier.close()
        listener.close()


def test_listen_fds_for_another_pid_are_ignored_and_removed() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
    assert systemd.listen_sockets(env) == []
    assert env == {}
    assert systemd.listen_sockets({}) == []


def test_bad_listen_fds_are_a_clear_error() -> None:
    with pytest.raises(MeteoritError, match="LISTEN_FDS"):
        systemd.listen_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({}, None),
])
def test_the_watchdog_interval_comes_from_watchdog_usec(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env) == expected
    assert "WATCHDOG_USEC" not in env and "WATCHDOG_PID" not in env


# --- the real master and systemd's notify socket


def start_notified(meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer, listener: NotifySocket,
                   settings: dict[str, dict[str, Any]] | None = None, **env: str) -> Meteorit:
    m = meteorit_factory({"redis": {"url": redis_server.url}, **(settings or {})}, start=False,
                         env={"NOTIFY_SOCKET": listener.address, **env})
    m.start(wait=False)
    return m


@pytest.mark.slow
def test_ready_only_once_every_worker_serves_http(meteorit_factory: Callable[..., Meteorit], tmp_path: Path,
                                                  redis_server: RedisServer, notify_socket: NotifySocket) -> None:
    # a plugin that holds each worker's boot for a while: READY=1 must wait for it
    (tmp_path / "slow_boot.py").write_text("import time\ntime.sleep(0.8)\n")
    m = start_notified(meteorit_factory, redis_server, notify_socket, {"server": {"plugins": ["slow_boot"]}})
    started = time.monotonic()
    _, ready = notify_socket.wait_for("READY")
    assert time.monotonic() - started >= 0.8
    assert len(m.logs("worker serving")) == 2  # both, before READY=1
    assert m.healthy()
    assert m.proc is not None and ready["MAINPID"] == str(m.proc.pid)
    assert ready["STATUS"] == "2/2 workers serving"
    notify_socket.receive(0.3)
    assert len(notify_socket.times("READY", since=0.0)) == 1  # once, not on every turn of the loop


@pytest.mark.slow
def test_stopping_on_a_graceful_stop(meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer,
                                     notify_socket: NotifySocket) -> None:
    m = start_notified(meteorit_factory, redis_server, notify_socket)
    ready_at, _ = notify_socket.wait_for("READY")
    m.signal(signal.SIGQUIT)
    notify_socket.wait_for("STOPPING", after=ready_at)
    assert m.wait() == 0


@pytest.mark.slow
def test_watchdog_pings_while_healthy_and_stops_when_workers_are_wedged(
        meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer, notify_socket: NotifySocket) -> None:
    m = start_notified(meteorit_factory, redis_server, notify_socket, WATCHDOG_USEC="2000000")
    ready_at, _ = notify_socket.wait_for("READY")
    notify_socket.receive(3.0)
    pings = notify_socket.times("WATCHDOG", since=ready_at)
    gaps = [b - a for a, b in zip([ready_at, *pings], pings)]
    assert len(pings) >= 3 and max(gaps) < 2.0, gaps  # 4 beats per WATCHDOG_USEC: systemd never fired
    status = [f["STATUS"] for _, f in notify_socket.messages if "STATUS" in f]
    assert any(re.fullmatch(r"2/2 workers serving, [\d.]+ req/s, [\d.]+ events/s", s) for s in status), status

    workers = list(m.worker_pids().values())
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)  # alive, but answering nothing
    try:
        wedged_at = time.monotonic()
        notify_socket.receive(3.0)
        # a ping earned before the stop may still go out at the next beat (0.5 s), no later one
        late = notify_socket.times("WATCHDOG", since=wedged_at + 1.2)
        assert late == []  # past WATCHDOG_USEC, systemd would kill and restart the service
        shown = [f["STATUS"] for when, f in notify_socket.messages if "STATUS" in f and when > wedged_at]
        assert "2/2 workers serving, 2 not answering" in shown  # what `systemctl status` shows meanwhile
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    woke_at = time.monotonic()
    notify_socket.wait_for("WATCHDOG", timeout=3.0, after=woke_at)


@pytest.mark.slow
def test_a_worker_that_exits_before_it_answers_is_gone_not_silent(
        meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer, notify_socket: NotifySocket) -> None:
    """A probed worker that dies (and is respawned) before it replies does not count as a
    wedged one: the service is healthy and WATCHDOG=1 goes on."""
    m = start_notified(meteorit_factory, redis_server, notify_socket, WATCHDOG_USEC="2000000")
    notify_socket.wait_for("READY")
    victim = m.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)  # probed, but it cannot answer
    try:
        seen_at, fields = notify_socket.wait_for("STATUS", timeout=5.0, after=time.monotonic())
        while "not answering" not in fields["STATUS"]:
            seen_at, fields = notify_socket.wait_for("STATUS", timeout=5.0, after=seen_at)
        # that beat has just asked again, the stopped worker included: it dies before the next
        os.kill(victim, signal.SIGKILL)
    except BaseException:
        os.kill(victim, signal.SIGKILL)
        raise
    # the next beat (0.5 s on) finds it gone, not silent: WATCHDOG=1, not one beat later
    ping_at, _ = notify_socket.wait_for("WATCHDOG", timeout=3.0, after=seen_at)
    assert ping_at - seen_at < 0.8, [(round(w - seen_at, 2), f) for w, f in notify_socket.messages]
    notify_socket.receive(0.6)
    shown = [f["STATUS"] for when, f in notify_socket.messages if "STATUS" in f and when > seen_at]
    assert shown and not [s for s in shown if "not answering" in s], shown
    m.signal(signal.SIGQUIT)
    assert m.wait() == 0


@pytest.mark.slow
def test_reloading_then_ready_around_a_reload(meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer,
                                              notify_socket: NotifySocket) -> None:
    m = start_notified(meteorit_factory, redis_server, notify_socket)
    ready_at, _ = notify_socket.wait_for("READY")
    # a setting that replaces the workers one at a time: READY=1 only once the new ones serve
    m.config.write_text(m.config.read_text().replace("[redis]\n", "[redis]\ntimeout = 4.0\n"))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m.signal(signal.SIGHUP)
    reloading_at, reloading = notify_socket.wait_for("RELOADING", after=ready_at)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    _, ready = notify_socket.wait_for("READY", after=reloading_at)
    assert m.logs("reload done") and ready["STATUS"].startswith("reloaded")
    assert m.healthy()

    # a config that cannot load: the reload is refused, and systemd hears READY=1 all the same
    m.config.write_text(m.config.read_text() + "[nonsense]\n")
    m.signal(signal.SIGHUP)
    again_at, _ = notify_socket.wait_for("RELOADING", after=reloading_at)
    _, ready = notify_socket.wait_for("READY", after=again_at)
    assert ready["STATUS"].startswith("reload failed")


# --- socket activation


# As systemd does it: the sockets as fds 3, 4, ..., LISTEN_FDS and LISTEN_FDNAMES, and
# LISTEN_PID = the master's own pid: a wrapper moves the fds, sets LISTEN_PID to its own
# pid and execs the master.
ACTIVATE = """
import fcntl, os, sys
passed = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in passed]
for fd in passed:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def start_activated(m: Meteorit, sockets: dict[str, socket.socket]) -> None:
    fds = [s.fileno() for s in sockets.values()]
    m.log_file = open(m.log_path, "ab")
    m.proc = subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), *METEORIT[1:], "-c", str(m.config)],
        pass_fds=fds, stdout=m.log_file, stderr=m.log_file, start_new_session=True, cwd=m.config.parent,
        env={**m.env, "LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": ":".join(sockets)})


def http_over_unix(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return s.recv(4096).split(b"\r\n", 1)[0]


@pytest.mark.slow
def test_socket_activation_serves_on_the_passed_sockets(meteorit_factory: Callable[..., Meteorit],
                                                        redis: redislib.Redis, redis_server: RedisServer,
                                                        tmp_path: Path) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}}, start=False)
    configured = m.port
    unix_path = tmp_path / "http.sock"
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(128)
        unix.bind(str(unix_path))
        unix.listen(128)
        m.port = tcp.getsockname()[1]
        start_activated(m, {"http": tcp, "local": unix})
    wait_until(lambda: len(m.logs("worker serving")) == 2 and m.healthy(), READY_TIMEOUT, "workers to serve")
    [started] = m.logs("listening on the sockets systemd passed; server.listen is not used")
    assert started["activated"] == {"http": f"127.0.0.1:{m.port}", "local": f"unix:{unix_path}"}
    for i in range(20):
        assert m.post({"type": "activated", "n": i}) == (202, {"accepted": 1})
    assert redis.llen(QUEUE) == 20
    assert http_over_unix(unix_path) == b"HTTP/1.1 200 OK"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", configured), timeout=2).close()
    m.signal(signal.SIGTTIN)  # a worker added later accepts on the same passed sockets
    wait_until(lambda: len(m.logs("worker serving")) == 3, READY_TIMEOUT, "the third worker to serve")
    assert all(m.post({"type": "after-ttin"})[0] == 202 for _ in range(10))
    m.signal(signal.SIGQUIT)
    assert m.wait() == 0
    assert unix_path.exists()  # systemd's socket: not ours to remove


# --- the unit files


def test_the_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs Debian's systemd)")
    # verify checks that ExecStart= exists: point it at this checkout's meteorit, nothing else changes
    here = shutil.which("meteorit", path=os.path.dirname(sys.executable)) or shutil.which("meteorit")
    assert here, "the meteorit console script is not installed in this environment"
    for name in ("meteorit.service", "meteorit.socket"):
        text = (ROOT / "conf" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/bin/meteorit", here))
    result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "meteorit.service"),
                             str(tmp_path / "meteorit.socket")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "meteorit" not in result.stderr, result.stderr


def test_the_unit_stops_gracefully_within_its_timeout() -> None:
    """KillSignal=SIGQUIT is the graceful stop; systemd must wait longer than it may take."""
    from meteorit import config
    from meteorit.master import arbiter as master, embedded

    unit = (ROOT / "conf" / "meteorit.service").read_text()
    directives = dict(re.findall(r"^(\w+)=(.*)$", unit, re.MULTILINE))
    assert directives["KillSignal"] == "SIGQUIT" and directives["KillMode"] == "mixed"
    graceful = config.load(None, env={}).server.graceful_timeout + master.KILL_GRACE
    assert float(directives["TimeoutStopSec"]) > graceful + embedded.STOP_TIMEOUT  # workers, then Redis
    assert directives["Type"] == "notify" and float(directives["WatchdogSec"]) > 0


def test_the_unit_gives_the_service_a_log_directory() -> None:
    """ProtectSystem=strict makes /var/log read-only: a log.file under /var/log/meteorit
    needs LogsDirectory= (made writable for the service; purging the package removes it)."""
    unit = (ROOT / "conf" / "meteorit.service").read_text()
    assert re.search(r"^LogsDirectory=meteorit$", unit, re.MULTILINE)
    assert re.search(r"^ProtectSystem=strict$", unit, re.MULTILINE)


@pytest.mark.slow
def test_systemctl_reload_fails_when_the_reload_is_refused(meteorit_factory: Callable[..., Meteorit],
                                                           redis_server: RedisServer) -> None:
    """The unit's ExecReload= lines, run as systemd runs them (in order, the first failure
    ends it), against a real master: exit 0 when the reload is applied, 1 when it is refused."""
    unit = (ROOT / "conf" / "meteorit.service").read_text()
    m = meteorit_factory({"redis": {"url": redis_server.url}})
    assert m.proc is not None
    here = os.path.dirname(sys.executable) + "/"

    def systemctl_reload() -> int:
        for line in re.findall(r"^ExecReload=(.*)$", unit, re.MULTILINE):
            argv = [word.replace("/usr/bin/", here).replace("/etc/meteorit/meteorit.toml", str(m.config))
                    .replace("$MAINPID", str(m.proc.pid)) for word in line.split()]  # type: ignore[union-attr]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=m.config.parent, env=m.env)
            if done.returncode != 0:
                return done.returncode
        return 0

    m.config.write_text(m.config.read_text().replace("[redis]\n", "[redis]\ntimeout = 4.0\n"))
    assert systemctl_reload() == 0
    assert m.logs("reload done")
    m.config.write_text(m.config.read_text().replace("[server]\n", "[server]\nmax_workers = 9\n"))
    assert systemctl_reload() == 1  # valid for `meteorit -t`, refused by the master: needs a restart
    assert m.healthy()
