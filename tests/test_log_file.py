"""`log.file`: every process appends to it, and USR1 makes the master and then each worker
reopen it, so logrotate can rename the file while meteorit runs."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import Meteorit, RedisServer, wait_until
from meteorit import log


def entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reopen_follows_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    handler = log.ReopenableFileHandler(str(path))
    try:
        handler.stream.write("one\n")
        path.rename(tmp_path / "m.log.1")
        handler.reopen()
        handler.stream.write("two\n")
    finally:
        handler.close()
    assert (tmp_path / "m.log.1").read_text() == "one\n" and path.read_text() == "two\n"


@pytest.mark.slow
def test_usr1_reopens_the_log_file_in_every_process(meteorit_factory: Callable[..., Meteorit],
                                                    redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "logs" / "meteorit.log"
    path.parent.mkdir()
    m = meteorit_factory({"redis": {"url": redis_server.url}, "log": {"file": str(path)}}, start=False)
    m.start(wait=False)
    wait_until(lambda: path.exists() and sum(e["msg"] == "worker serving" for e in entries(path)) == 2
               and m.healthy(), 20, "workers to serve")
    assert m.log_path.read_text() == ""  # nothing on stderr: everything went to the file

    rotated = path.with_name("meteorit.log.1")
    path.rename(rotated)  # what logrotate does, before it sends USR1
    m.signal(signal.SIGUSR1)
    wait_until(lambda: path.exists() and any(e["msg"] == "USR1: log file reopened" for e in entries(path)),
               10, "the master to reopen")
    m.signal(signal.SIGQUIT)
    assert m.wait() == 0
    after = entries(path)
    # each worker wrote its last line to the new file: they reopened too
    assert {e["pid"] for e in after if e["msg"] == "worker exits"} == set(m_pids(rotated))
    assert not any(e["msg"] == "worker exits" for e in entries(rotated))


def m_pids(path: Path) -> list[int]:
    return [e["worker_pid"] for e in entries(path) if e["msg"] == "worker started"]
