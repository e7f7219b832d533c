"""The packages: bin/meteorit-package builds the sdist, the wheel and the .deb from this
checkout; the .deb installs with dpkg -i on this machine (root, Debian: CI), its meteorit
checks and serves with the installed config as the `meteorit` user, then it is removed,
and purged, cleanly. Runs where root and dpkg are (CI); one such test at a time per machine.
The packaged config (bin/meteorit-package-config) is checked anywhere, in a moment."""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import free_port
from meteorit.values import SinkUrl, parse_sink_url
from meteorit.config import load as load_config
from test_systemd import NotifySocket

ROOT = Path(__file__).resolve().parent.parent
LOCK = "/tmp/meteorit-package-test.lock"
BUILD_TIMEOUT = 600  # a cold pip cache downloads every dependency from PyPI

needs_dpkg = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("dpkg-deb") is None or not Path("/usr/bin/python3").exists(),
    reason="installing a .deb needs root, dpkg and Debian's python3 (CI has them)")
PACKAGED_DB = "/var/lib/meteorit/meteorit.db"


def run(*argv: str, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def installed() -> bool:
    return run("dpkg-query", "-W", "-f=${Status}", "meteorit").stdout.startswith("install ok")


@pytest.fixture
def machine_lock() -> Iterator[None]:
    """dpkg and /etc/meteorit are the machine's: one package test at a time."""
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            pytest.skip("a meteorit package is already installed on this machine: not touching it")
        try:
            yield
        finally:
            run("dpkg", "--purge", "meteorit")  # whatever happened above


@pytest.mark.parametrize("example", ["conf/meteorit.toml", "a config without the sections"])
def test_the_packaged_config_names_absolute_paths_under_the_services_directories(example: str,
                                                                                 tmp_path: Path) -> None:
    """meteoritctl and meteorit-consumer read /etc/meteorit/meteorit.toml from any working
    directory: a relative path there would name another file for each of them."""
    source = ROOT / example if example.endswith(".toml") else tmp_path / "bare.toml"
    if not source.exists():
        source.write_text("[server]\nworkers = 2\n")
    target = tmp_path / "packaged.toml"
    done = run(sys.executable, str(ROOT / "bin" / "meteorit-package-config"), str(source), str(target))
    assert done.returncode == 0, done.stderr
    cfg = load_config(str(target), env={})
    assert parse_sink_url(cfg.values["consumer.sink"]) == SinkUrl("sqlite", PACKAGED_DB)
    assert cfg.values["redis.data_dir"] == "/var/lib/meteorit/redis"
    assert cfg.values["spool.dir"] == "/var/lib/meteorit/spool"
    assert cfg.values["control.socket"] == "/run/meteorit/control.sock"


@pytest.mark.slow
@needs_dpkg
def test_the_deb_builds_installs_serves_and_goes_away(machine_lock: None, tmp_path: Path) -> None:
    build = run(str(ROOT / "bin" / "meteorit-package"), "--out", str(tmp_path / "dist"), timeout=BUILD_TIMEOUT)
    assert build.returncode == 0, build.stderr
    sdist, wheel, deb = build.stdout.split()
    assert sdist.endswith(".tar.gz") and wheel.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as packed:  # package data: the snippet the workers serve
        assert "meteorit/worker/static/meteorit.js" in packed.namelist()
    assert Path(deb).name.startswith("meteorit_") and Path(deb).name.endswith(".deb")
    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert Path(deb).name.endswith(f"_{arch}.deb")

    install = run("dpkg", "-i", deb)
    assert install.returncode == 0, install.stdout + install.stderr
    user = pwd.getpwnam("meteorit")  # made by postinst
    config = Path("/etc/meteorit/meteorit.toml")
    assert "/etc/meteorit/meteorit.toml" in run("dpkg-query", "-W", "-f=${Conffiles}", "meteorit").stdout
    assert oct(config.stat().st_mode & 0o777) == "0o640" and config.stat().st_gid == user.pw_gid
    checked = run("meteorit", "-t", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    assert f'sink = "sqlite:///{PACKAGED_DB}"' in config.read_text()  # absolute: four slashes
    assert Path("/usr/bin/meteorit").resolve() == Path("/opt/meteorit/bin/meteorit")
    if shutil.which("systemd-analyze"):
        verify = run("systemd-analyze", "verify", "--man=no", "/lib/systemd/system/meteorit.service")
        assert verify.returncode == 0 and "meteorit" not in verify.stderr, verify.stderr

    serve_as_the_service_would(tmp_path)

    removed = run("dpkg", "-r", "meteorit")
    assert removed.returncode == 0, removed.stderr
    assert not Path("/opt/meteorit").exists() and not Path("/usr/bin/meteorit").exists()
    assert config.exists() and Path("/var/lib/meteorit/redis").is_dir()  # conffile and data stay
    purged = run("dpkg", "--purge", "meteorit")
    assert purged.returncode == 0, purged.stderr
    assert not Path("/etc/meteorit").exists() and not Path("/var/lib/meteorit").exists()
    assert not [p for p in Path("/etc/systemd/system").rglob("meteorit*")]


def serve_as_the_service_would(tmp_path: Path) -> None:
    """meteorit.service's ExecStart, as User=meteorit in /var/lib/meteorit with
    /run/meteorit, telling a notify socket when it is ready (systemd isn't PID 1 here)."""
    run("install", "-d", "-o", "meteorit", "-g", "meteorit", "-m", "0750", "/run/meteorit")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mn-") as short:
        os.chmod(short, 0o755)
        notify = NotifySocket(os.path.join(short, "notify"))
        os.chmod(notify.address, 0o777)  # the service's user sends to it
        log_path = tmp_path / "installed.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["setpriv", "--reuid=meteorit", "--regid=meteorit", "--init-groups",  # execs: no parent left
                 "/usr/bin/meteorit", "-c", "/etc/meteorit/meteorit.toml", "--listen", f"127.0.0.1:{port}",
                 "--workers", "2"],
                cwd="/var/lib/meteorit", env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": notify.address},
                stdout=log, stderr=log, start_new_session=True)
            try:
                notify.wait_for("READY", timeout=30)
                assert post_one(port) == b"HTTP/1.1 202"
                assert get_one(port, b"/v1/meteorit.js") == b"HTTP/1.1 200"  # shipped and found
                status = run("meteoritctl", "-c", "/etc/meteorit/meteorit.toml", "status")
                assert status.returncode == 0, status.stderr
                proc.send_signal(signal.SIGQUIT)  # KillSignal= of the unit
                assert proc.wait(timeout=45) == 0, log_path.read_text()
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
                notify.close()


def post_one(port: int) -> bytes:
    body = b'{"type":"installed"}'
    return status_line(port, b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def get_one(port: int, path: bytes) -> bytes:
    return status_line(port, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)


def status_line(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        reply = b""
        while b"\r\n" not in reply:
            part = s.recv(4096)
            if not part:
                break
            reply += part
    return reply.split(b"\r\n", 1)[0][:12]
