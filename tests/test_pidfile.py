"""The pid file (`server.pid_file`): written at start, locked while its meteorit lives (the
lock, not the pid in it, refuses a second start), removed at exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import METEORIT, Meteorit, RedisServer
from meteorit.errors import MeteoritError
from meteorit.master.pidfile import PidFile


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
    path.unlink()  # removed by hand, and a successor started: its file is not ours to remove
    successor = PidFile(str(path))
    successor.create(12345)
    pidfile.remove()
    assert path.read_text() == "12345\n"
    successor.remove()


def test_a_stale_or_garbled_pid_file_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "m.pid"
    for stale in (f"{dead_pid()}\n", "garbage"):
        path.write_text(stale)
        pidfile = PidFile(str(path))
        pidfile.create(os.getpid())
        pidfile.remove()
        assert not path.exists()


def test_a_pid_file_nobody_locks_is_stale_whatever_pid_it_holds(tmp_path: Path) -> None:
    """`echo 1 > pidfile`, or the pid of a dead master reused after a reboot: a live pid
    without the lock is not a meteorit."""
    path = tmp_path / "m.pid"
    for live in (1, os.getppid()):
        path.write_text(f"{live}\n")
        pidfile = PidFile(str(path))
        pidfile.create(os.getpid())
        assert path.read_text() == f"{os.getpid()}\n"
        pidfile.remove()
        assert not path.exists()


def test_a_locked_pid_file_is_refused_until_its_holder_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "m.pid"
    holder = PidFile(str(path))
    holder.create(4242)
    with pytest.raises(MeteoritError, match="already runs with pid 4242"):
        PidFile(str(path)).create(os.getpid())
    assert path.read_text() == "4242\n"  # the refused start changed nothing
    holder.remove()
    successor = PidFile(str(path))
    successor.create(os.getpid())
    successor.remove()
    with pytest.raises(MeteoritError, match="cannot write"):
        PidFile(str(tmp_path / "missing" / "m.pid")).create(os.getpid())


HOLDER = """
import os, signal, sys
from meteorit.master.pidfile import PidFile
PidFile(sys.argv[1]).create(os.getpid())
child = os.posix_spawn("/bin/sleep", ["sleep", "60"], dict(os.environ))  # as redis-server is started
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a master killed with -9: its child lives on
"""


def test_the_lock_dies_with_the_master_not_with_what_it_started(tmp_path: Path) -> None:
    path = tmp_path / "m.pid"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with proc.stdout:
        child = int(proc.stdout.readline())  # the sleep keeps the pipe open: no reading to EOF
    assert proc.wait(timeout=30) == -signal.SIGKILL
    try:
        assert Path(f"/proc/{child}").exists()  # still runs, with the pid file's fd had it been inheritable
        pidfile = PidFile(str(path))
        pidfile.create(os.getpid())
        pidfile.remove()
    finally:
        os.kill(child, signal.SIGKILL)


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
