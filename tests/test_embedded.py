"""The embedded Redis as the real master supervises it: a restart never stalls the
master's loop (meteoritctl answers, workers spool) however long redis-server takes to come
up, and failed starts are retried with a backoff. redis.server_binary is a stand-in
script that runs the real redis-server, slow or failing on demand."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis as redislib

from conftest import REDIS_SERVER, Meteorit, wait_until
from meteorit.master import embedded as embedded_module
from meteorit.master.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow

QUEUE = "meteorit:events"
STALL = 8  # seconds the stand-in sleeps before it runs redis-server (START_TIMEOUT is 10)


class StandIn:
    """redis-server behind a shell script: `slow` makes its next start sleep STALL seconds
    first (as a big AOF would), `fail` makes every start exit 1 (a broken install)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.slow, self.fail, self.woke = tmp / "slow", tmp / "fail", tmp / "woke"
        self.binary = tmp / "redis-stand-in"
        self.binary.write_text(
            "#!/bin/sh\n"
            f"if [ -e {self.fail} ]; then exit 1; fi\n"
            f"if [ -e {self.slow} ]; then sleep {STALL}; rm -f {self.slow}; touch {self.woke}; fi\n"
            f'exec {REDIS_SERVER} "$@"\n')
        self.binary.chmod(0o755)


@pytest.fixture
def embedded(meteorit_factory: Callable[..., Meteorit], tmp_path: Path) -> Iterator[tuple[Meteorit, StandIn, Path]]:
    stand_in = StandIn(tmp_path)
    data = tmp_path / "redis-data"
    m = meteorit_factory({"redis": {"url": "embedded", "data_dir": str(data),
                                    "server_binary": str(stand_in.binary)}})
    try:
        yield m, stand_in, data
    finally:
        m.stop()  # the master first: it would restart the Redis killed below
        kill_redis(data)


def kill_redis(data: Path) -> None:
    try:
        os.kill(int((data / "redis.pid").read_text()), signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass


def redis_state(m: Meteorit) -> dict[str, Any]:
    return m.ctl_json("status")["master"]["embedded_redis"]


def test_a_slow_restart_leaves_the_master_answering_and_the_workers_spooling(
        embedded: tuple[Meteorit, StandIn, Path]) -> None:
    m, stand_in, data = embedded
    stand_in.slow.touch()
    kill_redis(data)
    wait_until(lambda: m.logs("restarting embedded redis"), 10, "the master to restart redis")
    # while redis-server has not even started (the stand-in sleeps), the master answers...
    status = m.ctl_json("status")
    assert not stand_in.woke.exists(), "meteoritctl status was answered only once redis-server ran"
    state = status["master"]["embedded_redis"]
    assert state["state"] == "starting" and state["restarts"] == 1
    # ... and the workers take events into their spool
    assert m.post({"type": "during"}) == (202, {"accepted": 1, "spooled": True})
    assert not stand_in.woke.exists(), f"the stand-in slept {STALL}s: too slow a machine for this test"
    wait_until(lambda: len(m.logs("embedded redis started")) == 2, 30, "redis to answer again")
    assert stand_in.woke.exists()
    client = redislib.Redis(unix_socket_path=str(data / "redis.sock"), socket_timeout=5)
    wait_until(lambda: [json.loads(r)["type"] for r in client.lrange(QUEUE, 0, -1)] == ["during"], 20,
               "the spooled event replayed into the restarted redis")
    assert redis_state(m)["state"] == "up"
    assert m.post({"type": "after"}) == (202, {"accepted": 1})
    client.close()


def test_failed_starts_are_retried_with_a_growing_backoff(embedded: tuple[Meteorit, StandIn, Path]) -> None:
    m, stand_in, data = embedded
    stand_in.fail.touch()
    kill_redis(data)

    def downs() -> list[dict[str, Any]]:
        return m.logs("embedded redis is down; workers spool until it is back")
    wait_until(lambda: len(downs()) >= 4, 30, "four failures in a row")
    # at once after the death, then 0.5 s, doubling: no restart storm
    assert [(d["failures"], d["retry_in"]) for d in downs()[:4]] == [(1, 0.0), (2, 0.5), (3, 1.0), (4, 2.0)]
    assert downs()[1]["reason"] == "redis-server exited"
    state = redis_state(m)  # the master answers throughout
    assert state["state"] in ("down", "starting") and state["failures"] >= 4
    assert m.post({"type": "while down"}) == (202, {"accepted": 1, "spooled": True})
    stand_in.fail.unlink()
    wait_until(lambda: len(m.logs("embedded redis started")) == 2, 30, "redis to start once it can")
    client = redislib.Redis(unix_socket_path=str(data / "redis.sock"), socket_timeout=5)
    wait_until(lambda: client.llen(QUEUE) == 1, 20, "the spooled event replayed")
    assert redis_state(m)["state"] == "up"
    client.close()


# --- the start's checks, against a fake redis.sock (no redis-server): what an answer means


class FakeRedisSocket:
    """Listens at `path` and answers each connection's PING with the next of `answers`
    (None: accept and never answer)."""

    def __init__(self, path: Path, answers: list[bytes | None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.answers = answers
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for answer in self.answers:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if answer is None:
                self.held.append(conn)
                continue
            with conn:
                try:
                    conn.recv(64)
                    conn.sendall(answer)
                except OSError:
                    pass  # the probe gave up on this connection

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread (Linux)
        self.thread.join(5)
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def starting(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, subprocess.Popen[bytes]]]:
    """An EmbeddedRedis in the middle of a start: its 'redis-server' is a sleep process."""
    redis = EmbeddedRedis(str(tmp_path))
    child = subprocess.Popen(["sleep", "60"])
    redis.pid, redis.state = child.pid, embedded_module.STARTING
    redis._deadline = 1000.0 + embedded_module.START_TIMEOUT
    yield redis, child
    child.kill()
    child.wait()


def look_until(redis: EmbeddedRedis, now: float, state: str) -> None:
    deadline = time.monotonic() + 10
    while redis.state != state:
        assert time.monotonic() < deadline, f"still {redis.state}"
        redis.supervise(now)
        time.sleep(0.01)


def test_a_redis_that_is_loading_its_aof_gets_more_time(starting: tuple[EmbeddedRedis, Any],
                                                        tmp_path: Path) -> None:
    redis, child = starting
    server = FakeRedisSocket(tmp_path / "redis.sock", [b"-LOADING Redis is loading the dataset in memory\r\n",
                                                       b"+PONG\r\n"])
    try:
        first = redis._deadline
        late = first + 1  # past the first deadline, but it said LOADING
        deadline = time.monotonic() + 10
        while redis._deadline == first:  # its first answer moves the deadline on
            assert time.monotonic() < deadline, "no LOADING seen"
            redis.supervise(first - 1)
            time.sleep(0.01)
        look_until(redis, late, embedded_module.UP)
        assert redis.failures == 0 and child.poll() is None
    finally:
        server.close()


def test_a_redis_that_never_answers_is_killed_and_retried_later(starting: tuple[EmbeddedRedis, Any],
                                                                tmp_path: Path) -> None:
    redis, child = starting
    server = FakeRedisSocket(tmp_path / "redis.sock", [None] * 50)
    redis.failures = 1  # it died once already: the next try waits
    try:
        redis.supervise(1000.0)  # connects and asks
        assert redis.state == embedded_module.STARTING
        redis.supervise(1000.0 + embedded_module.START_TIMEOUT + 0.1)
        assert redis.state == embedded_module.DOWN and redis.failures == 2
        assert child.wait(5) == -signal.SIGKILL  # the master's reaper would collect it now
        redis.reaped()
        assert redis.wait(1000.0 + embedded_module.START_TIMEOUT + 0.1) == pytest.approx(0.5)
    finally:
        server.close()


def test_restart_delays_double_up_to_the_maximum() -> None:
    delays = [embedded_module.restart_delay(n) for n in range(1, 10)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
