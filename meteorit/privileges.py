"""Running requests as an unprivileged user when meteorit is started as root.

Owns: looking up `server.user` / `server.group`; giving that user the paths its processes
must write (the embedded Redis's data directory, the log file, so USR1 can reopen it);
and the switch itself, in a child right after fork: setgroups, setgid, setuid (in that
order: once the uid is gone, so is the right to change groups), then a check that root
cannot be had back.
Must not touch: binding or forking decisions (the master binds first, as root, then
forks; workers call `drop` before they build anything that serves a request).

The master keeps root. It does no request work and parses no client input, and it needs
root to bind the SO_REUSEPORT socket of a respawned or added worker (the kernel accepts
a socket into a reuseport group only from the euid that opened the group), to bind a
port below 1024 again after a reload, to reopen a log file in a root-owned directory
and to start every worker as root so that it can drop to the user. nginx works the same.
What root does in the user's directories never follows a link the user could plant
there (see `give`; embedded.py and log.py open their files the same way).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import signal
import stat
import sys
from dataclasses import dataclass

from .errors import ConfigError, MeteoritError

log = logging.getLogger("meteorit.privileges")

EXIT_EXEC_FAILED = 127  # a child that could not become the user or exec, as the shell says


@dataclass(frozen=True)
class Identity:
    """Who the workers (and the embedded Redis) run as."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups: the user's own, never root's


def resolve(user: str, group: str = "") -> Identity | None:
    """`server.user` and `server.group` (names or numbers) looked up; None when no user is set."""
    if not user:
        if group:
            raise ConfigError("server.group", "needs server.user too")
        return None
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ConfigError("server.user", f"no such user {user!r}") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError("server.group", f"no such group {group!r}") from None
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, gid))))
    return Identity(pw.pw_name, pw.pw_uid, gid, groups)


def switching(identity: Identity | None) -> bool:
    """Whether processes we start change user: we are root and a user is set."""
    return identity is not None and os.geteuid() == 0 and identity.uid != 0


def warn_if_useless(identity: Identity | None) -> None:
    """Called by the master at start: say so when the workers will serve as root, or when a
    user is set that a non-root master cannot switch to."""
    if identity is None and os.geteuid() == 0:
        log.warning("running as root without server.user: the workers serve requests as root")
    elif identity is not None and os.geteuid() != 0 and os.geteuid() != identity.uid:
        log.warning("server.user is %r but meteorit does not run as root: workers keep uid %d",
                    identity.user, os.geteuid())


def drop(identity: Identity | None) -> None:
    """In a child just forked by a root master: become `identity` for good, or raise."""
    if not switching(identity):
        return
    assert identity is not None
    os.setgroups(list(identity.groups))
    os.setresgid(identity.gid, identity.gid, identity.gid)  # real, effective and saved: no way back
    os.setresuid(identity.uid, identity.uid, identity.uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise MeteoritError(f"could regain root after switching to {identity.user!r}; refusing to serve")


def give(identity: Identity | None, path: str, recursive: bool = False) -> None:
    """Make `path` (and with `recursive` everything under it) belong to the user, so that
    processes running as the user can write, rotate or reopen it.

    The master is root and these paths are, or become, the user's: whatever the user can
    plant there (a symlink, a hard link) must not turn into root changing files elsewhere.
    So `path` itself must not be a symlink and must be root's or the user's already, the
    walk never follows a link (os.fwalk on directory fds, chown relative to them), and a
    file with more than one link is left alone (a hard link to a file we must not give)."""
    if not switching(identity) or not path:
        return
    assert identity is not None
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MeteoritError(f"cannot give {path} to user {identity.user!r}: {exc.strerror}") from None
    _check_top(path, top, identity)
    if recursive and stat.S_ISDIR(top.st_mode):
        _give_tree(path, identity)
    else:
        _chown(path, top, identity)


def prepare_dir(identity: Identity | None, path: str) -> None:
    """A directory the user's processes write in (the spool): made here, as root, where the
    user may not create it, and handed over with what a root run left in it."""
    if not switching(identity):
        return
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise MeteoritError(f"cannot create {path}: {exc.strerror}") from None
    give(identity, path, recursive=True)


def _check_top(path: str, top: os.stat_result, identity: Identity) -> None:
    """Refuse what the user could have put in place of the path we were told to give."""
    if stat.S_ISLNK(top.st_mode):
        raise MeteoritError(f"{path} is a symbolic link: not giving its target to user {identity.user!r} "
                            "(name the real path)")
    if top.st_uid not in (os.geteuid(), identity.uid):
        raise MeteoritError(f"{path} belongs to uid {top.st_uid}, neither root nor user {identity.user!r}: "
                            "not taking it over")


def _give_tree(path: str, identity: Identity) -> None:
    # follow_symlinks=False: fwalk checks that each directory it opens is the one it
    # lstat()ed, so a directory swapped for a symlink mid-walk is not entered
    walked = False
    try:
        for root, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
            if not walked:
                walked = True
                os.chown(dir_fd, identity.uid, identity.gid)  # the top, through the fd fwalk checked
            for name in dirs + files:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile (a replayed spool file)
                _chown(os.path.join(root, name), st, identity, (dir_fd, name))
    except OSError as exc:
        raise MeteoritError(f"cannot give {path} to user {identity.user!r}: {exc.strerror}") from None
    if not walked:
        raise MeteoritError(f"{path} changed while being given to user {identity.user!r}; not given")


def _chown(path: str, st: os.stat_result, identity: Identity, at: tuple[int, str] | None = None) -> None:
    """chown that never follows a symlink; `at` is (directory fd, name) inside a walk."""
    if (st.st_uid, st.st_gid) == (identity.uid, identity.gid):
        return
    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
        log.warning("not giving %s to user %r: it has %d hard links", path, identity.user, st.st_nlink)
        return
    dir_fd, name = at if at is not None else (None, path)
    try:
        os.chown(name, identity.uid, identity.gid, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MeteoritError(f"cannot give {path} to user {identity.user!r}: {exc.strerror}") from None


def spawn(argv: list[str], env: dict[str, str], identity: Identity | None) -> int:
    """Start a program in a new session, as `identity` when we are root; returns its pid.
    (posix_spawn cannot change uid, so that case forks: the master has no threads and no
    event loop, so forking is safe.)"""
    if not switching(identity):
        return os.posix_spawn(argv[0], argv, env, setsid=True)
    pid = os.fork()
    if pid == 0:  # child: never returns into the master's code
        try:
            signal.set_wakeup_fd(-1)  # the master's self-pipe is not ours to write
            os.setsid()
            drop(identity)
            os.execve(argv[0], argv, env)
        except BaseException as exc:  # noqa: BLE001 - the child reports and exits whatever happened
            sys.stderr.write(f"meteorit: cannot start {argv[0]} as {identity and identity.user}: {exc}\n")
        finally:
            os._exit(EXIT_EXEC_FAILED)
    return pid
