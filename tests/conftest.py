"""Fixtures: a real redis-server on a free port, and the real `meteorit` master as a
subprocess in its own session, waited on for readiness and cleaned up with killpg."""

from __future__ import annotations

import http.client
import json
import os
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

REDIS_SERVER = shutil.which("redis-server")
METEORIT = [sys.executable, "-m", "meteorit.cli"]
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy; fail the test past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


class RedisServer:
    def __init__(self, workdir: str) -> None:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed: run .ci/run or apt-get install redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = redislib.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.answers, READY_TIMEOUT, "redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None

    def answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redislib.RedisError:
            return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="meteorit-redis-") as workdir:
        server = RedisServer(workdir)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> redislib.Redis:
    if redis_server.proc is None:  # a test stopped it
        redis_server.start()
    redis_server.client.flushall()
    return redis_server.client


def toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists of scalars are valid TOML


class Meteorit:
    """The real master as a subprocess; its stderr (JSON log lines) goes to a file."""

    def __init__(self, tmp: Path, settings: dict[str, dict[str, Any]],
                 env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.base = f"127.0.0.1:{self.port}"
        sections = dict(settings)
        sections["server"] = {"listen": [self.base], "workers": 2, **settings.get("server", {})}
        self.config = tmp / "meteorit.toml"
        self.config.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
            for name, table in sections.items()))
        self.workers = sections["server"]["workers"]
        self.log_path = tmp / "meteorit.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file: Any = None

    def start(self, argv: list[str] | None = None, wait: bool = True) -> None:
        if self.log_file is not None:
            self.log_file.close()
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv or [*METEORIT, "-c", str(self.config)], stderr=self.log_file,
            stdout=self.log_file, start_new_session=True, cwd=self.config.parent, env=self.env)
        if wait:
            wait_until(lambda: len(self.logs("worker serving")) >= self.workers and self.healthy(),
                       READY_TIMEOUT, "meteorit workers to serve")

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"meteorit exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            return self.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def logs(self, msg: str | None = None) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if msg is None or entry.get("msg") == msg:
                lines.append(entry)
        return lines

    def worker_pids(self) -> dict[int, int]:
        """slot → pid of the workers started last in each slot."""
        return {e["slot"]: e["worker_pid"] for e in self.logs("worker started")}

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def post(self, body: Any, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
        status, _, data = self.request("POST", "/v1/events", raw,
                                       {"Content-Type": content_type, **(headers or {})})
        return status, json.loads(data) if data else None

    def ctl(self, *args: str, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """meteoritctl -c <this config> ARGS, run where the master runs (relative paths agree)."""
        return subprocess.run([sys.executable, "-m", "meteorit.ctl", "-c", str(self.config), *args],
                              input=None if input is None else input.decode(), capture_output=True,
                              text=True, cwd=self.config.parent, env=self.env, timeout=timeout)

    def ctl_json(self, *args: str) -> dict[str, Any]:
        done = self.ctl("--json", *args)
        assert done.stdout, done.stderr
        return json.loads(done.stdout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
        if self.log_file is not None:
            self.log_file.close()


@pytest.fixture
def meteorit_factory(tmp_path: Path) -> Iterator[Callable[..., Meteorit]]:
    started: list[Meteorit] = []

    def make(settings: dict[str, dict[str, Any]] | None = None, start: bool = True,
             env: dict[str, str] | None = None) -> Meteorit:
        m = Meteorit(tmp_path, settings or {}, env)
        started.append(m)
        if start:
            m.start()
        return m

    yield make
    for m in started:
        m.stop()


@pytest.fixture
def meteorit(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
             redis_server: RedisServer) -> Meteorit:
    return meteorit_factory({"redis": {"url": redis_server.url}})
