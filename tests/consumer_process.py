"""A meteorit-consumer process for the tests: its config, its logs, its exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from conftest import kill_group, toml_value

CONSUMER = [sys.executable, "-m", "meteorit.consumer"]
QUEUE = "meteorit:events"
EXIT_TIMEOUT = 60


class Consumer:
    """A meteorit-consumer process in its own session; JSON logs to a file."""

    def __init__(self, tmp: Path, name: str, redis_url: str | dict[str, Any], sink: str, log_level: str = "info",
                 **consumer: Any) -> None:
        """`redis_url`: single mode's URL, or the whole [redis] section (cluster, sentinel)."""
        self.dir = tmp
        self.name = name
        self.config = tmp / f"{name}.toml"
        settings = {"sink": sink, "lease": 1.0, "name": name, "stats_interval": 0.2, **consumer}
        redis = {"url": redis_url} if isinstance(redis_url, str) else redis_url
        redis = {"queue": QUEUE, **redis}
        self.config.write_text(
            "[redis]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in redis.items())
            + f"[log]\nlevel = {toml_value(log_level)}\n"
            "[consumer]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))
        self.log_path = tmp / f"{name}.log"
        self.out_path = tmp / f"{name}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, stdout: int | None = None, limits: Callable[[], None] | None = None) -> Consumer:
        """`stdout`: subprocess.PIPE for a pipe of our own (else a file); `limits` runs in the
        child before exec (resource limits)."""
        with open(self.log_path, "ab") as err, open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen([*CONSUMER, "-c", str(self.config), *args],
                                         stdout=out if stdout is None else stdout, stderr=err,
                                         start_new_session=True, cwd=self.dir, preexec_fn=limits)
        return self

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"consumer {self.name} did not exit:\n{self.log_path.read_text()}") from None

    def run_once(self, *args: str) -> int:
        return self.start("--once", *args).wait()

    def logs(self, msg: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text().splitlines() if self.log_path.exists() else []:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if msg is None or entry.get("msg") == msg:
                found.append(entry)
        return found

    def stdout(self) -> str:
        return self.out_path.read_text()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
