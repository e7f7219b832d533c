"""The pid file (`server.pid_file`): written at start, refused while its meteorit lives,
removed at exit."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from conftest import METEORIT, Meteorit, RedisServer
from meteorit.errors import MeteoritError
from meteorit.pidfile import PidFile


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # just reaped: nobody has it for a while


def test_a_pid_file_is_written_whole_and_removed_only_by_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "m.pid"
    pidfile = PidFile(str(path))
    pidfile.create(os.getpid())
    assert path.read_text() == f"{os.getpid()}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pid"]  # no temporary left over
    path.write_text("12345\n")  # replaced by a successor: not ours to remove any more
    pidfile.remove()
    assert path.exists()


def test_a_stale_or_garbled_pid_file_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "m.pid"
    for stale in (f"{dead_pid()}\n", "garbage"):
        path.write_text(stale)
        pidfile = PidFile(str(path))
        pidfile.create(os.getpid())
        pidfile.remove()
        assert not path.exists()


def test_a_live_pid_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pid"
    path.write_text(f"{os.getppid()}\n")
    with pytest.raises(MeteoritError, match="already runs with pid"):
        PidFile(str(path)).create(os.getpid())
    with pytest.raises(MeteoritError, match="cannot write"):
        PidFile(str(tmp_path / "missing" / "m.pid")).create(os.getpid())


@pytest.mark.slow
def test_the_master_writes_its_pid_file_and_a_second_master_stops_there(
        meteorit_factory: Callable[..., Meteorit], redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "run" / "meteorit.pid"
    path.parent.mkdir()
    m = meteorit_factory({"redis": {"url": redis_server.url}, "server": {"pid_file": str(path)}})
    assert m.proc is not None and path.read_text() == f"{m.proc.pid}\n"
    # same config, reuseport on the same port would let it bind: the pid file stops it first
    second = subprocess.run([*METEORIT, "-c", str(m.config)], capture_output=True, text=True, timeout=30,
                            cwd=tmp_path)
    assert second.returncode == 1
    assert f"meteorit already runs with pid {m.proc.pid}" in second.stderr
    assert m.healthy() and path.read_text() == f"{m.proc.pid}\n"
    m.signal(signal.SIGQUIT)
    assert m.wait() == 0
    assert not path.exists()
