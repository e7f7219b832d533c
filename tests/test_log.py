"""`log.format`: `auto` (the default) writes text when stderr is a terminal and JSON
otherwise (journald, pipes, files, `log.file`); `json` and `text` force either. Checked
on the real master and its workers with stderr on a pseudo-terminal (the `pty` module), as
`make run` in a shell has it, and on a file, as journald and the test fixtures have it."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import METEORIT, READY_TIMEOUT, Meteorit, RedisServer, wait_until
from meteorit import log


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    """A pseudo-terminal: (the side we read, the side a process writes to)."""
    reader, writer = pty.openpty()
    yield reader, writer
    for fd in (reader, writer):
        try:
            os.close(fd)
        except OSError:
            pass


def test_auto_is_text_on_a_terminal_and_json_elsewhere(terminal: tuple[int, int], tmp_path: Path) -> None:
    with open(terminal[1], "w", closefd=False) as tty, open(tmp_path / "f", "w") as file:
        assert log.resolve_format("auto", "", tty) == "text"
        assert log.resolve_format("auto", "", file) == "json"
        assert log.resolve_format("auto", str(tmp_path / "m.log"), tty) == "json"  # log.file: never a terminal
        assert log.resolve_format("json", "", tty) == "json"
        assert log.resolve_format("text", "", file) == "text"
    read, write = os.pipe()
    with os.fdopen(write, "w") as pipe:
        assert log.resolve_format("auto", "", pipe) == "json"
    os.close(read)
    assert log.resolve_format("auto", "", None) == "json"  # type: ignore[arg-type]  # no stderr at all


def read_until(fd: int, done: Callable[[str], bool], timeout: float, what: str) -> str:
    """Read the terminal until `done(text)` holds; fail past `timeout`."""
    text, deadline = "", time.monotonic() + timeout
    while not done(text):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; the terminal shows:\n{text}")
        if select.select([fd], [], [], left)[0]:
            try:
                text += os.read(fd, 65536).decode(errors="replace")
            except OSError:  # EIO: every writer closed it
                break
    return text.replace("\r\n", "\n")


def start_on_terminal(m: Meteorit, terminal: tuple[int, int]) -> None:
    """The master with stdout and stderr on the terminal, as in a shell (the factory kills it)."""
    m.proc = subprocess.Popen([*METEORIT, "-c", str(m.config)], stdin=subprocess.DEVNULL, stdout=terminal[1],
                              stderr=terminal[1], start_new_session=True, cwd=m.config.parent, env=m.env)


def serving_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "worker serving" in line]


@pytest.mark.slow
def test_a_terminal_gets_text_from_the_master_and_every_worker(meteorit_factory: Callable[..., Meteorit],
                                                               redis_server: RedisServer,
                                                               terminal: tuple[int, int]) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}}, start=False)  # log.format left to its default
    start_on_terminal(m, terminal)
    text = read_until(terminal[0], lambda t: len(serving_lines(t)) >= 2, READY_TIMEOUT, "two workers serving")
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and not any(line.lstrip().startswith("{") for line in lines), text
    # time, level, who (the worker's slot), pid, message
    who = {line.split()[2] for line in serving_lines(text)}
    assert who == {"worker[0]", "worker[1]"}, text
    assert any(" master " in line for line in lines), text


@pytest.mark.slow
def test_json_forced_on_a_terminal(meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer,
                                   terminal: tuple[int, int]) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}, "log": {"format": "json"}}, start=False)
    start_on_terminal(m, terminal)
    text = read_until(terminal[0], lambda t: len(serving_lines(t)) >= 2, READY_TIMEOUT, "two workers serving")
    served = [json.loads(line) for line in serving_lines(text)]
    assert {e["slot"] for e in served} == {0, 1} and {e["role"] for e in served} == {"worker"}


@pytest.mark.slow
def test_a_log_file_gets_json_while_stderr_is_a_terminal(meteorit_factory: Callable[..., Meteorit],
                                                         redis_server: RedisServer, terminal: tuple[int, int],
                                                         tmp_path: Path) -> None:
    path = tmp_path / "logs" / "meteorit.log"
    path.parent.mkdir()
    m = meteorit_factory({"redis": {"url": redis_server.url}, "log": {"file": str(path)}}, start=False)
    start_on_terminal(m, terminal)

    def entries() -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    wait_until(lambda: sum(e["msg"] == "worker serving" for e in entries()) == 2 and m.healthy(),
               READY_TIMEOUT, "two workers serving, in the log file")
    assert {e["role"] for e in entries()} == {"master", "worker"}


@pytest.mark.slow
def test_a_file_or_pipe_gets_json_by_default(meteorit_factory: Callable[..., Meteorit],
                                             redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}})  # stderr to a file, default format
    lines = [line for line in m.log_path.read_text().splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    assert {e["slot"] for e in m.logs("worker serving")} == {0, 1}


@pytest.mark.slow
def test_text_is_forced_off_a_terminal(meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}, "log": {"format": "text"}}, start=False)
    m.start(wait=False)
    wait_until(lambda: len(serving_lines(m.log_path.read_text())) == 2 and m.healthy(), READY_TIMEOUT,
               "two workers serving")
    assert m.logs() == []  # not one JSON line
