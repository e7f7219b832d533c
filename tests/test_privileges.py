"""Privilege drop: a root master binds, then its workers and the embedded Redis run as
`server.user`; requests are never served as root, and nothing the user plants in the
paths given to it (symlinks, hard links) makes the root master write or chown elsewhere.
The end-to-end tests need root (CI runs as root); the look-ups are tested as anyone."""

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
import redis as redislib

from conftest import METEORIT, Meteorit, wait_until
from meteorit import log, privileges
from meteorit.master.embedded import EmbeddedRedis
from meteorit.errors import ConfigError, EmbeddedRedisError, MeteoritError

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


# --- a root master never follows what the user can plant in the paths given to it


def as_nobody(script: str) -> None:
    """Run `script` as the unprivileged user: what a compromised worker or redis-server can do."""
    result = subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
                             "sh", "-ec", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def root_file(path: Path, text: str = "root's\n") -> Path:
    path.write_text(text)
    path.chmod(0o644)
    return path


@needs_root
def test_a_symlinked_or_foreign_directory_is_not_given(open_dir: Path) -> None:
    nobody = privileges.resolve("nobody")
    rootdir = open_dir / "rootdir"
    rootdir.mkdir()
    secret = root_file(rootdir / "secret")
    (open_dir / "spool").symlink_to(rootdir)  # planted where the spool directory should be
    with pytest.raises(MeteoritError, match="spool is a symbolic link"):
        privileges.prepare_dir(nobody, str(open_dir / "spool"))
    foreign = open_dir / "foreign"
    foreign.mkdir()
    os.chown(foreign, 4321, 4321)
    with pytest.raises(MeteoritError, match="belongs to uid 4321"):
        privileges.give(nobody, str(foreign), recursive=True)
    assert rootdir.stat().st_uid == 0 and secret.stat().st_uid == 0
    assert foreign.stat().st_uid == 4321


@needs_root
def test_the_walk_gives_what_is_inside_and_follows_no_link(open_dir: Path) -> None:
    nobody = privileges.resolve("nobody")
    outside = open_dir / "outside"
    outside.mkdir()
    secret, other = root_file(outside / "secret"), root_file(outside / "other")
    spool = open_dir / "spool"
    (spool / "sub").mkdir(parents=True)
    mine = root_file(spool / "sub" / "left-by-a-root-run")
    (spool / "to-file").symlink_to(secret)
    (spool / "to-dir").symlink_to(outside)
    os.link(other, spool / "hard")  # what fs.protected_hardlinks=0 would let the user make
    privileges.give(nobody, str(spool), recursive=True)
    assert {p.lstat().st_uid for p in (spool, spool / "sub", mine)} == {NOBODY.pw_uid}
    assert [p.stat().st_uid for p in (outside, secret, other)] == [0, 0, 0]


def test_the_log_file_is_not_opened_through_a_symlink(tmp_path: Path) -> None:
    victim = root_file(tmp_path / "victim")
    planted = tmp_path / "m.log"
    planted.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        log.ReopenableFileHandler(str(planted))
    planted.unlink()
    handler = log.ReopenableFileHandler(str(planted))
    try:
        planted.rename(tmp_path / "m.log.1")
        planted.symlink_to(victim)  # planted between logrotate's rename and USR1
        with pytest.raises(OSError, match="symbolic link"):
            handler.reopen()
        handler.stream.write("still to the old file\n")
    finally:
        handler.close()
    (tmp_path / "dangling.log").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError):
        log.ReopenableFileHandler(str(tmp_path / "dangling.log"))
    assert victim.read_text() == "root's\n" and not (tmp_path / "nowhere").exists()
    assert (tmp_path / "m.log.1").read_text() == "still to the old file\n"


def test_the_embedded_lock_is_not_opened_through_a_symlink(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    (data / "meteorit.lock").symlink_to(tmp_path / "created-by-root")
    with pytest.raises(EmbeddedRedisError, match="symbolic link"):
        EmbeddedRedis(str(data)).start()
    assert not (tmp_path / "created-by-root").exists()


@needs_root
@pytest.mark.slow
def test_the_root_master_restarting_redis_follows_none_of_the_users_links(
        meteorit_factory: Callable[..., Meteorit], open_dir: Path) -> None:
    """The user's redis-server points redis.conf at a file of root's and redis.sock at the
    system's Redis, then dies: the master restarts it, and neither is touched."""
    victim = root_file(open_dir / "victim")
    system_sock = open_dir / "system-redis.sock"
    system = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(system_sock), "--save", "",
                               "--appendonly", "no", "--dir", str(open_dir)],
                              stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        system_client = redislib.Redis(unix_socket_path=str(system_sock), socket_timeout=5)

        def system_answers() -> bool:
            try:
                return bool(system_client.ping())
            except redislib.ConnectionError:
                return False
        wait_until(system_answers, 10, "the system's redis-server")
        data = open_dir / "redis"
        m = meteorit_factory({"server": {"user": "nobody"}, "redis": {"data_dir": str(data)},
                              "spool": {"dir": str(open_dir / "spool")}})
        assert m.post({"type": "before"}) == (202, {"accepted": 1})
        redis_pid = int((data / "redis.pid").read_text())
        as_nobody(f"ln -sf {victim} {data}/redis.conf.new && mv {data}/redis.conf.new {data}/redis.conf; "
                  f"ln -sf {system_sock} {data}/redis.sock.new && mv {data}/redis.sock.new {data}/redis.sock; "
                  f"kill -KILL {redis_pid}")  # -9: redis-server does not remove redis.sock
        wait_until(lambda: len(m.logs("embedded redis started")) == 2, 20, "the embedded redis to restart")
        assert m.post({"type": "after"}) == (202, {"accepted": 1})
        assert victim.read_text() == "root's\n" and victim.stat().st_uid == 0
        assert system_answers()  # not shut down as "an embedded redis left by a previous run"
        assert not (data / "redis.conf").is_symlink() and not (data / "redis.sock").is_symlink()
        m.signal(signal.SIGQUIT)
        assert m.wait() == 0
        system_client.close()
    finally:
        system.kill()
        system.wait()
