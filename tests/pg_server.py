"""A throw-away PostgreSQL server for tests and bin/meteorit-consumer-bench: initdb in a
temporary directory, started on a free port with its socket in that directory, stopped
and removed at the end. Run as the `postgres` user when we are root (initdb refuses
root). `hold()` keeps a transaction (and the locks it took) open in a psql session of
its own, as another application would. Stdlib only, no pytest: the bench imports it too."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

START_TIMEOUT = 60


def pg_bin_dir() -> str | None:
    """The directory of pg_ctl and initdb, or None when PostgreSQL is not installed."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True):
        if os.path.exists(os.path.join(candidate, "pg_ctl")):
            return candidate
    found = shutil.which("pg_ctl")
    return os.path.dirname(os.path.realpath(found)) if found else None


def _version(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: str, durable: bool = False, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = bin_dir
        self.settings = settings or {}
        self.durable = durable  # tests skip fsync (commits still survive a server crash)
        self.port = _free_port()
        self.base = tempfile.mkdtemp(prefix="meteorit-pg-")
        self.data = os.path.join(self.base, "data")
        self.log = os.path.join(self.base, "postgres.log")
        self.user = "meteorit"
        self.dsn = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chmod(self.base, 0o755)
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str, timeout: float = START_TIMEOUT) -> None:
        subprocess.run([*self._as, *argv], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout, cwd=self.base)

    def start(self) -> None:
        self._run(f"{self.bin_dir}/initdb", "-D", self.data, "-A", "trust", "-U", self.user, "-E", "UTF8",
                  "--no-sync")
        self.resume()

    def resume(self) -> None:
        """Start the server (again, after pause) on the same port and data."""
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"  # no OS crash here, only server ones
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run(f"{self.bin_dir}/pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t",
                  str(START_TIMEOUT), "start")

    def pause(self) -> None:
        """An outage: immediate stop, the data kept for resume()."""
        self._run(f"{self.bin_dir}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", timeout=30)

    def stop(self) -> None:
        """Immediate stop (the data is thrown away), then the directory goes."""
        try:
            self.pause()
        except (subprocess.SubprocessError, OSError):
            self._kill_postmaster()
        shutil.rmtree(self.base, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                pid = int(f.readline())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def hold(self, *statements: str) -> Holder:
        """A psql session that runs `statements` in a transaction left open (a lock taken
        and held, as another application would), until the Holder is released."""
        return Holder([*self._as, f"{self.bin_dir}/psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(self.port),
                       "-U", self.user, "-d", "postgres", "-v", "ON_ERROR_STOP=1"], statements)

    def psql(self, sql: str) -> str:
        """One query through psql; the unaligned, tuples-only output."""
        out = subprocess.run([f"{self.bin_dir}/psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(self.port),
                              "-U", self.user, "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             check=True, capture_output=True, text=True, timeout=60)
        return out.stdout.strip()


class Holder:
    """A psql process holding a transaction open; its reply to a marker query says the
    statements before it are done (the lock is held). release() rolls back and waits."""

    MARKER = "meteorit-holder-ready"

    def __init__(self, argv: list[str], statements: tuple[str, ...]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("BEGIN;\n" + "".join(f"{sql};\n" for sql in statements) +
                              f"SELECT '{self.MARKER}';\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:  # psql answers each query in turn; the marker comes last
            if line.strip() == self.MARKER:
                return
        _, err = self.proc.communicate(timeout=START_TIMEOUT)
        raise RuntimeError(f"psql could not take the lock: {err.strip()}")

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("ROLLBACK;\n")
                self.proc.stdin.close()
                self.proc.wait(START_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
