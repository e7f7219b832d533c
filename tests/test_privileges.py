"""Privilege drop: a root master binds, then its workers and the embedded Redis run as
`server.user`; requests are never served as root. The end-to-end test needs root (CI
runs as root); the look-ups are tested as anyone."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import METEORIT, Meteorit, wait_until
from meteorit import privileges
from meteorit.errors import ConfigError

NOBODY = pwd.getpwnam("nobody")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")


def ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/PID/status."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: [int(x) for x in v.split()] for k, _, v in (line.partition(":\t") for line in lines)
            if k in ("Uid", "Gid", "Groups")}


def test_no_user_means_no_switch() -> None:
    assert privileges.resolve("", "") is None
    privileges.drop(None)  # nothing to do, nothing raised


def test_a_user_resolves_to_its_ids_and_groups() -> None:
    identity = privileges.resolve("nobody")
    assert identity is not None
    assert (identity.uid, identity.gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert 0 not in identity.groups or NOBODY.pw_gid == 0
    assert privileges.resolve(str(NOBODY.pw_uid)) == identity  # a number works too
    group = grp.getgrgid(0).gr_name
    assert privileges.resolve("nobody", group).gid == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("user, group, key", [
    ("no-such-user-meteorit", "", "server.user"),
    ("nobody", "no-such-group-meteorit", "server.group"),
    ("", "nogroup", "server.group"),
])
def test_unknown_users_and_groups_are_config_errors(user: str, group: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        privileges.resolve(user, group)
    assert info.value.key == key


def test_meteorit_t_names_an_unknown_user(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text('[server]\nuser = "no-such-user-meteorit"\n')
    result = subprocess.run([*METEORIT, "-t", "-c", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "server.user: no such user 'no-such-user-meteorit'" in result.stderr


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory `nobody` can reach (pytest's tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="meteorit-priv-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_root
@pytest.mark.slow
def test_a_root_master_runs_workers_and_embedded_redis_as_the_user(
        meteorit_factory: Callable[..., Meteorit], open_dir: Path) -> None:
    m = meteorit_factory({"server": {"user": "nobody"}, "redis": {"data_dir": str(open_dir / "redis")},
                          "spool": {"dir": str(open_dir / "spool")}})
    assert m.post({"type": "as-nobody"}) == (202, {"accepted": 1})  # served, and stored by that Redis

    assert m.proc is not None and ids(m.proc.pid)["Uid"] == [0, 0, 0, 0]  # the master keeps root
    nobody = [NOBODY.pw_uid] * 4
    for pid in m.worker_pids().values():
        worker = ids(pid)
        assert worker["Uid"] == nobody and worker["Gid"] == [NOBODY.pw_gid] * 4
        assert worker["Groups"] == sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid)))  # not root's
    redis_pid = int((open_dir / "redis" / "redis.pid").read_text())
    assert ids(redis_pid)["Uid"] == nobody
    assert (open_dir / "redis").stat().st_uid == NOBODY.pw_uid
    assert (open_dir / "spool").stat().st_uid == NOBODY.pw_uid  # made by the master, for them

    # a respawned worker drops root as well
    os.kill(m.worker_pids()[0], signal.SIGKILL)
    wait_until(lambda: len(m.logs("worker serving")) >= 3, 20, "the respawned worker to serve")
    assert ids(m.worker_pids()[0])["Uid"] == nobody
    m.signal(signal.SIGQUIT)
    assert m.wait() == 0
