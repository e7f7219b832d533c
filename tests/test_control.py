"""The control socket and meteoritctl, end to end against the real master: every command
and exit code, refused peers, garbage on the socket, and reloads that keep serving."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
import redis as redislib

from conftest import METEORIT, Meteorit, RedisServer, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def served(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
           redis_server: RedisServer) -> Meteorit:
    return meteorit_factory({"redis": {"url": redis_server.url}})


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def read_frame(sock: socket.socket) -> dict[str, Any]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the master closed the connection without a reply"
            data += chunk
        return data
    (size,) = struct.unpack(">I", exactly(4))
    body = exactly(size)
    return json.loads(body) if body[:1] == b"{" else msgpack.unpackb(body)


def control_path(m: Meteorit) -> str:
    return str(m.config.parent / "var" / "run" / "meteorit.sock")


def rewrite(m: Meteorit, **sections: dict[str, Any]) -> None:
    """Set keys in the config file (other keys stay)."""
    import tomllib
    data = tomllib.loads(m.config.read_text())
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    m.config.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items())
                                for name, t in data.items()))


# --- commands and exit codes


def test_status_and_workers_list_every_worker(served: Meteorit) -> None:
    pids = set(served.worker_pids().values())
    done = served.ctl("status")
    assert done.returncode == 0, done.stderr
    assert f"meteorit master {served.proc.pid}" in done.stdout
    for pid in pids:
        assert str(pid) in done.stdout
    status = served.ctl_json("status")
    assert status["master"]["pid"] == served.proc.pid
    assert {w["pid"] for w in status["workers"]} == pids
    assert {w["version"] for w in status["workers"]} == {status["master"]["config_version"]}
    assert all(w["state"] == "serving" and w["restarts"] == 0 for w in status["workers"])
    workers = served.ctl_json("workers")["workers"]
    assert {w["pid"] for w in workers} == pids


def test_status_counts_requests_and_restarts(served: Meteorit) -> None:
    for _ in range(5):
        assert served.post({"type": "a"})[0] == 202
    victim = served.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(served.logs("worker ready")) >= 3, 20, "respawn")
    status = served.ctl_json("status")
    assert status["master"]["worker_restarts"] == 1
    assert {w["slot"]: w["restarts"] for w in status["workers"]} == {0: 1, 1: 0}
    assert sum(w["requests"] or 0 for w in status["workers"]) >= 0  # victim's count died with it
    assert all(isinstance(w["requests"], int) for w in status["workers"])


def test_broadcast_ping_wait_lists_every_live_worker(served: Meteorit) -> None:
    pids = set(served.worker_pids().values())
    done = served.ctl("broadcast", "ping", "--wait", "2")
    assert done.returncode == 0, done.stderr
    replies = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert {int(p) for p in replies} == pids
    version = served.ctl_json("status")["master"]["config_version"]
    for pid, data in replies.items():
        assert json.loads(data) == {"pid": int(pid), "version": version}
    sent = served.ctl_json("broadcast", "ping")
    assert sent["ok"] and set(sent["sent_to"]) == pids and "replies" not in sent


def test_send_with_data_from_a_file_and_from_stdin(served: Meteorit, tmp_path: Path) -> None:
    pid = served.worker_pids()[1]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(200 * 1024))  # far larger than a command line or a 4K packet
    reply = served.ctl_json("send", str(pid), "ping", f"@{big}", "--wait", "2")
    assert [r["pid"] for r in reply["replies"]] == [pid] and reply["missing"] == []
    done = served.ctl("send", str(pid), "ping", "-", "--wait", "2", input=b"x" * 100_000)
    assert done.returncode == 0 and done.stdout.startswith(f"{pid}: "), done.stderr


def test_stats_sum_what_was_sent(served: Meteorit) -> None:
    for i in range(7):
        assert served.post([{"type": "a"}] * (i + 1))[0] == 202
    assert served.post({"no": "type"})[0] == 400
    stats = served.ctl_json("stats")
    assert stats["total"]["events_accepted"] == 28
    assert stats["total"]["requests"]["202"] == 7
    assert stats["total"]["events_rejected"] == {"invalid": 1}
    assert stats["missing_workers"] == [] and len(stats["workers"]) == 2
    assert served.ctl("stats").returncode == 0


def test_scale_up_and_down(served: Meteorit, redis: redislib.Redis) -> None:
    assert served.ctl("scale", "4").returncode == 0
    assert len(served.ctl_json("workers")["workers"]) == 4
    done = served.ctl("scale", "1")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: len(served.ctl_json("workers")["workers"]) == 1, 20, "scale down to 1")
    assert served.post({"type": "after"})[0] == 202
    assert redis.llen("meteorit:events") == 1


def test_exit_codes(served: Meteorit, tmp_path: Path) -> None:
    assert served.ctl("send", "1", "ping").returncode == 1  # no such pid on the bus
    assert "no process with pid 1" in served.ctl("send", "1", "ping").stderr
    assert served.ctl("scale", "0").returncode == 1
    assert served.ctl("scale", "many").returncode == 2  # argparse
    assert served.ctl("frobnicate").returncode == 2
    nowhere = served.ctl("-s", str(tmp_path / "nobody.sock"), "status")
    assert nowhere.returncode == 3 and "not running" in nowhere.stderr


def test_global_options_work_after_the_command(served: Meteorit, tmp_path: Path) -> None:
    done = served.ctl("status", "--json")  # it used to be a usage error (exit 2)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["master"]["pid"] == served.proc.pid
    sock = control_path(served)
    for argv in (["workers", "-s", sock, "--json"], ["-s", sock, "workers", "--json"],
                 ["--json", "workers", "--timeout", "5", "-s", sock]):
        done = served.ctl(*argv)
        assert done.returncode == 0, (argv, done.stderr)
        assert len(json.loads(done.stdout)["workers"]) == 2
    nowhere = served.ctl("status", "-s", str(tmp_path / "nobody.sock"), "--json")  # -s after the command wins
    assert nowhere.returncode == 3 and "not running" in nowhere.stderr
    assert served.ctl("status", "--frob").returncode == 2


def test_data_that_looks_like_an_option_goes_after_double_dash(meteorit_factory: Callable[..., Meteorit],
                                                                 redis_server: RedisServer, tmp_path: Path) -> None:
    """`--` ends the options: what follows reaches the workers verbatim (the probe plugin
    echoes it back), even `--json` or `-s`, which would otherwise change meteoritctl."""
    probe_dir = tmp_path / "probes"
    probe_dir.mkdir()
    tests_dir = str(Path(__file__).resolve().parent)
    m = meteorit_factory({"redis": {"url": redis_server.url}, "server": {"plugins": ["ipc_probe"]}},
                         env={"METEORIT_PROBE_DIR": str(probe_dir),
                              "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])})
    pids = set(m.worker_pids().values())
    done = m.ctl("broadcast", "probe.echo", "--wait", "2", "--", "--json")
    assert done.returncode == 0, done.stderr
    assert dict(line.split(": ", 1) for line in done.stdout.splitlines()) == {str(p): "--json" for p in pids}
    pid = min(pids)
    done = m.ctl("send", str(pid), "probe.echo", "--json", "--wait", "2", "--", "-s")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replies"] == [{"pid": pid, "data": "-s"}]
    done = m.ctl("send", str(pid), "probe.echo", "-", "--wait", "2", "--json", input=b"--from stdin")
    assert done.returncode == 0 and json.loads(done.stdout)["replies"][0]["data"] == "--from stdin", done.stderr
    done = m.ctl("broadcast", "probe.echo", "--json", "--wait", "2")  # no DATA: --json is an option
    assert done.returncode == 0 and {r["data"] for r in json.loads(done.stdout)["replies"]} == {""}


def test_stop_fast_and_graceful(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
                                redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}})
    assert m.post({"type": "a"})[0] == 202
    done = m.ctl("stop", "--graceful")
    assert done.returncode == 0 and "graceful" in done.stdout
    assert m.wait(30) == 0
    assert redis.llen("meteorit:events") == 1
    after = m.ctl("status")
    assert after.returncode == 3
    m.start()
    assert m.ctl("stop").returncode == 0
    assert m.wait(30) == 0


# --- the socket itself


def test_garbage_gets_an_error_and_the_master_stays_up(served: Meteorit) -> None:
    path = control_path(served)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(frame(b"\xc1\xc1 not msgpack"))
        assert "cannot decode" in read_frame(s)["error"]
        s.sendall(frame(msgpack.packb([1, 2, 3])))
        assert "cmd" in read_frame(s)["error"]
        s.sendall(frame(b'{"cmd": "selfdestruct"}'))
        reply = read_frame(s)
        assert reply["ok"] is False and "unknown command" in reply["error"]
        s.sendall(frame(b'{"cmd": "workers"}'))  # the same connection still works, in JSON
        assert read_frame(s)["ok"] is True
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(struct.pack(">I", 0xFFFFFFFF) + b"x" * 100)
        assert "over the limit" in read_frame(s)["error"]
        assert s.recv(1) == b""  # closed: the stream cannot be resynchronised
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b"\x00\x00")  # half a length, then gone
    assert served.ctl("status").returncode == 0
    assert served.post({"type": "still"})[0] == 202


def test_a_half_closed_peer_gets_its_replies_and_deep_garbage_is_refused(served: Meteorit) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(control_path(served))
        s.sendall(frame(b'{"cmd": "stats"}') + frame(b'{"cmd": "workers"}'))
        s.shutdown(socket.SHUT_WR)  # as nc -N and socat do
        stats, workers = read_frame(s), read_frame(s)
        assert stats["ok"] and "total" in stats and workers["ok"] and len(workers["workers"]) == 2
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(control_path(served))
        s.sendall(frame(b"[" * 5000 + b"]" * 5000) + frame(b'{"cmd": "workers"}'))
        assert "cannot decode" in read_frame(s)["error"]
        assert read_frame(s)["ok"] is True


def test_built_in_alerts_cannot_be_sent_from_meteoritctl(served: Meteorit) -> None:
    for name in ("ipc.table", "config.apply", "worker.ready", "rate.demand", "master.stats"):
        done = served.ctl("broadcast", name, "garbage")
        assert done.returncode == 1 and "built-in" in done.stderr
    done = served.ctl("send", str(served.proc.pid), "ipc.table", "garbage")
    assert done.returncode == 1
    assert served.ctl("status").returncode == 0 and served.post({"type": "a"})[0] == 202


def test_socket_is_private_and_a_live_one_is_not_stolen(served: Meteorit) -> None:
    mode = os.stat(control_path(served)).st_mode & 0o777
    assert mode == 0o600
    second = served.config.parent / "second.toml"
    second.write_text(served.config.read_text().replace(served.base, f"127.0.0.1:{free_port()}"))
    done = subprocess.run([*METEORIT, "-c", str(second)], cwd=served.config.parent, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1
    assert "another meteorit master runs there" in done.stderr
    assert served.ctl("status").returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid (CI runs as root)")
def test_a_peer_with_another_uid_is_refused(meteorit_factory: Callable[..., Meteorit],
                                           redis: redislib.Redis, redis_server: RedisServer) -> None:
    public = tempfile.mkdtemp(prefix="mctl-")
    os.chmod(public, 0o755)
    path = os.path.join(public, "ctl.sock")
    m = meteorit_factory({"redis": {"url": redis_server.url}, "control": {"socket": path}})
    os.chmod(path, 0o666)  # only SO_PEERCRED stands between this uid and the master now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                try:
                    s.sendall(frame(msgpack.packb({"cmd": "stop"})))
                except OSError:
                    pass  # refused already: the reason is waiting to be read
                os.write(w, json.dumps(read_frame(s)).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    reply = json.loads(os.read(r, 65536))
    os.close(r)
    assert reply["ok"] is False and "permission denied: uid 65534" in reply["error"]
    assert any("refused uid 65534" in e["msg"] for e in m.logs())
    assert m.ctl("-s", path, "status").returncode == 0  # root still may, and nothing stopped
    assert m.post({"type": "a"})[0] == 202


# --- reload


def test_reload_with_a_bad_config_keeps_serving(served: Meteorit) -> None:
    before = served.ctl_json("status")["master"]["config_version"]
    rewrite(served, limits={"max_body": "lots"})
    done = served.ctl("reload")
    assert done.returncode == 1
    assert "limits.max_body" in done.stderr
    rewrite(served, server={"max_workers": 9})
    rewrite(served, limits={"max_body": "1MiB"})
    done = served.ctl("reload")
    assert done.returncode == 1 and "server.max_workers" in done.stderr and "restart" in done.stderr
    served.config.write_text("this is [not toml")
    served.signal(signal.SIGHUP)
    wait_until(lambda: served.logs("reload refused, the running config stays: %s: %s") or
               [e for e in served.logs() if e["msg"].startswith("reload refused")], 10, "HUP refused")
    status = served.ctl_json("-s", control_path(served), "status")
    assert status["master"]["config_version"] == before
    assert {w["version"] for w in status["workers"]} == {before}
    assert status["master"]["reload_failures"] == 3
    assert served.post({"type": "a"})[0] == 202


def test_hot_reload_reaches_every_worker_without_replacing_them(served: Meteorit) -> None:
    pids = set(served.worker_pids().values())
    rewrite(served, auth={"keys": ["sekret"]})
    reply = served.ctl_json("reload")
    assert reply["ok"] and reply["mode"] == "hot" and reply["changed"] == ["auth.keys"]
    assert reply["workers_by_version"] == {reply["version"]: 2}
    for _ in range(4):  # whichever worker takes the connection
        assert served.post({"type": "a"})[0] == 401
        assert served.post({"type": "a"}, headers={"X-Api-Key": "sekret"})[0] == 202
    pings = served.ctl_json("broadcast", "ping", "--wait", "2")["replies"]
    assert {json.loads(r["data"])["version"] for r in pings} == {reply["version"]}
    assert {r["pid"] for r in pings} == pids  # the same processes


def test_replacing_reload_starts_new_workers_then_retires_the_old(served: Meteorit) -> None:
    old = set(served.worker_pids().values())
    rewrite(served, redis={"timeout": 4.0})
    reply = served.ctl_json("reload")
    assert reply["ok"] and reply["mode"] == "replace", reply
    assert reply["workers_by_version"] == {reply["version"]: 2}
    new = {w["pid"] for w in served.ctl_json("workers")["workers"] if w["state"] == "serving"}
    assert len(new) == 2 and not new & old
    wait_until(lambda: all(not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]
                           for p in old), 30, "old workers to exit")


def test_a_reload_that_scales_up_with_a_config_that_cannot_boot_rolls_back(served: Meteorit) -> None:
    old = set(served.worker_pids().values())
    before = served.ctl_json("status")["master"]["config_version"]
    rewrite(served, server={"workers": 3, "plugins": ["no_such_module_anywhere"]})
    done = served.ctl("reload")
    assert done.returncode == 1 and "rolled back" in done.stderr, done.stdout + done.stderr
    status = served.ctl_json("status")
    assert status["master"]["config_version"] == before
    assert status["master"]["workers_wanted"] == 2
    assert {w["pid"] for w in status["workers"] if w["state"] == "serving"} == old
    assert served.post({"type": "a"})[0] == 202


def test_a_replacement_that_cannot_boot_keeps_the_old_workers(served: Meteorit) -> None:
    old = set(served.worker_pids().values())
    before = served.ctl_json("status")["master"]["config_version"]
    rewrite(served, server={"plugins": ["no_such_module_anywhere"]})
    done = served.ctl("reload")
    assert done.returncode == 1 and "rolled back" in done.stderr, done.stdout + done.stderr
    status = served.ctl_json("status")
    assert status["master"]["config_version"] == before
    assert {w["pid"] for w in status["workers"]} == old
    assert served.post({"type": "a"})[0] == 202


def test_listen_changes_reload_after_a_crash_and_serve_on_the_new_addresses(served: Meteorit) -> None:
    os.kill(served.worker_pids()[0], signal.SIGKILL)  # its reuseport sockets close with it
    wait_until(lambda: len(served.logs("worker ready")) >= 3, 20, "respawn")
    second, third = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    for listen in ([served.base, second], [served.base, second, third], [served.base]):
        rewrite(served, server={"listen": listen})
        done = served.ctl("reload")
        assert done.returncode == 0, done.stderr
        for address in listen:
            port = int(address.rsplit(":", 1)[1])
            for attempt in range(4):  # new connections: every socket of the address is accepted on
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    conn.request("POST", "/v1/events", b'{"type":"a"}', {"Content-Type": "application/json"})
                    assert conn.getresponse().status == 202
                except TimeoutError:
                    raise AssertionError(f"{address} hangs after reloading to {listen}, try {attempt}") from None
                finally:
                    conn.close()
    assert served.proc.poll() is None


def test_control_group_opens_the_socket_to_that_group(meteorit_factory: Callable[..., Meteorit],
                                                      redis: redislib.Redis, redis_server: RedisServer) -> None:
    import grp
    group = grp.getgrgid(os.getegid()).gr_name  # a group this user may give files to
    m = meteorit_factory({"redis": {"url": redis_server.url}, "control": {"group": group}})
    info = os.stat(control_path(m))
    assert info.st_mode & 0o777 == 0o660 and info.st_gid == os.getegid()
    assert m.ctl("status").returncode == 0
