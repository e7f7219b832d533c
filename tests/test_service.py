"""End to end: the real master and workers, a real redis-server, real HTTP and signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
import redis as redislib

from conftest import METEORIT, Meteorit, RedisServer, wait_until

QUEUE = "meteorit:events"
pytestmark = pytest.mark.slow


def queued(redis: redislib.Redis) -> list[dict[str, Any]]:
    return [json.loads(r) for r in redis.lrange(QUEUE, 0, -1)]


def raw_exchange(port: int, payload: bytes, responses: int, chunk: int | None = None,
                 timeout: float = 10) -> bytes:
    """Send raw bytes (in `chunk`-sized writes if given) and read until `responses`
    complete responses (or EOF) arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        step = chunk or len(payload)
        for i in range(0, len(payload), step):
            s.sendall(payload[i:i + step])
        data = b""
        while data.count(b"HTTP/1.1 ") < responses or not _complete(data):
            part = s.recv(65536)
            if not part:
                break
            data += part
        return data


def _complete(data: bytes) -> bool:
    head, sep, body = data.rpartition(b"\r\n\r\n")
    if not sep:
        return False
    length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")]
    return bool(length) and len(body) >= length[-1]


def post_bytes(body: bytes, content_type: bytes = b"application/json", extra: bytes = b"") -> bytes:
    return (b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (content_type, len(body), extra, body))


# --- body formats: N events in, N records in Redis


def test_single_json_event_is_queued_with_id_and_received_at(meteorit: Meteorit, redis: redislib.Redis) -> None:
    before = int(time.time() * 1000)
    status, reply = meteorit.post({"type": "click", "x": 1})
    assert (status, reply) == (202, {"accepted": 1})
    [record] = queued(redis)
    assert record["type"] == "click" and record["x"] == 1
    assert len(record["id"]) == 36 and record["id"][14] == "7"
    assert before <= record["received_at"] <= int(time.time() * 1000)


def test_array_keeps_order_and_client_ids(meteorit: Meteorit, redis: redislib.Redis) -> None:
    events = [{"type": "view", "n": i} for i in range(50)] + [{"type": "view", "id": "mine-1"}]
    assert meteorit.post(events) == (202, {"accepted": 51})
    records = queued(redis)
    assert [r.get("n") for r in records[:50]] == list(range(50))
    assert records[50]["id"] == "mine-1"
    assert len({r["id"] for r in records}) == 51


def test_ndjson_and_msgpack(meteorit: Meteorit, redis: redislib.Redis) -> None:
    ndjson = b'{"type":"a"}\n\n{"type":"b","v":[1,2]}\n'
    assert meteorit.post(ndjson, "application/x-ndjson") == (202, {"accepted": 2})
    packed = msgpack.packb([{"type": "m", "k": "v"}, {"type": "m2"}, {"type": "m3"}])
    assert meteorit.post(packed, "application/msgpack") == (202, {"accepted": 3})
    assert [r["type"] for r in queued(redis)] == ["a", "b", "m", "m2", "m3"]


# --- every rejection answers its status and queues nothing

REJECTIONS: list[tuple[str, Any, str, dict[str, str], int]] = [
    ("bad json", b'{"type": ', "application/json", {}, 400),
    ("no type", [{"type": "ok"}, {"kind": "x"}], "application/json", {}, 400),
    ("empty type", {"type": ""}, "application/json", {}, 400),
    ("not an object", [1], "application/json", {}, 400),
    ("empty body", b"", "application/json", {}, 400),
    ("bad ndjson line", b'{"type":"a"}\nnope\n', "application/x-ndjson", {}, 400),
    ("bad msgpack", b"\xc1", "application/msgpack", {}, 400),
    ("unsupported type", b"type=a", "application/x-www-form-urlencoded", {}, 415),
    ("brotli", {"type": "a"}, "application/json", {"Content-Encoding": "br"}, 415),
    ("two encodings", {"type": "a"}, "application/json", {"Content-Encoding": "gzip, gzip"}, 415),
    ("gzip that is not", {"type": "a"}, "application/json", {"Content-Encoding": "gzip"}, 400),
    ("too many events", [{"type": "a"}] * 11, "application/json", {}, 413),
    ("event too large", {"type": "a", "pad": "x" * 600}, "application/json", {}, 413),
    ("body too large", [{"type": "a", "pad": "x" * 100}] * 20, "application/json", {}, 413),
]


@pytest.fixture
def limited(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
            redis_server: RedisServer) -> Meteorit:
    return meteorit_factory({"redis": {"url": redis_server.url},
                             "limits": {"max_events_per_request": 10, "max_event_size": 512,
                                        "max_body": 2048}})


@pytest.mark.parametrize("name,body,ctype,headers,expected", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejection(limited: Meteorit, redis: redislib.Redis, name: str, body: Any, ctype: str,
                   headers: dict[str, str], expected: int) -> None:
    status, reply = limited.post(body, ctype, headers)
    assert status == expected, reply
    assert reply["error"]
    assert redis.llen(QUEUE) == 0


def test_first_bad_event_is_named_by_index(meteorit: Meteorit, redis: redislib.Redis) -> None:
    status, reply = meteorit.post([{"type": "a"}, {"type": "b"}, {"type": 3}, {}])
    assert status == 400 and reply["index"] == 2 and "type" in reply["error"]
    assert redis.llen(QUEUE) == 0


def test_routes_and_methods(meteorit: Meteorit) -> None:
    assert meteorit.request("GET", "/nope")[0] == 404
    status, headers, _ = meteorit.request("GET", "/v1/events")
    assert status == 405 and headers["Allow"] == "POST, OPTIONS"
    assert meteorit.request("GET", "/readyz")[0] == 200


def test_api_keys(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
                  redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}, "auth": {"keys": ["k1-secret", "k2-secret"]}})
    assert m.post({"type": "a"})[0] == 401
    assert m.post({"type": "a"}, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert m.post({"type": "a"}, headers={"X-Api-Key": "k1-secre"})[0] == 401
    assert redis.llen(QUEUE) == 0
    assert m.post({"type": "a"}, headers={"Authorization": "Bearer k2-secret"})[0] == 202
    assert m.post({"type": "a"}, headers={"X-Api-Key": "k1-secret"})[0] == 202
    assert redis.llen(QUEUE) == 2
    assert not any("secret" in line for line in m.log_path.read_text().splitlines())


# --- the HTTP layer over real sockets


def test_request_split_across_many_writes(meteorit: Meteorit, redis: redislib.Redis) -> None:
    body = json.dumps([{"type": "split", "i": i} for i in range(20)]).encode()
    data = raw_exchange(meteorit.port, post_bytes(body), 1, chunk=7)
    assert data.startswith(b"HTTP/1.1 202 ") and data.endswith(b'{"accepted":20}')
    assert redis.llen(QUEUE) == 20


def test_pipelined_requests_are_answered_in_order(meteorit: Meteorit, redis: redislib.Redis) -> None:
    requests = [post_bytes(json.dumps([{"type": "p"}] * n).encode()) for n in range(1, 11)]
    requests.insert(5, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    data = raw_exchange(meteorit.port, b"".join(requests), len(requests))
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in data.split(b"HTTP/1.1 ")[1:]]
    expected = [b'{"accepted":%d}' % n for n in range(1, 11)]
    expected.insert(5, b"ok\n")
    assert bodies == expected
    assert redis.llen(QUEUE) == 55


def test_malformed_request_gets_400_and_close(meteorit: Meteorit) -> None:
    data = raw_exchange(meteorit.port, b"BLAH /\x00 HTTP/9\r\n\r\n", 1)
    assert data.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in data


def test_slow_client_gets_408(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
                              redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}, "limits": {"header_timeout": 0.5}})
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
        s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: t\r\n")  # and never the rest
        data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 408 ")
        assert s.recv(65536) == b""  # then closed
    assert m.healthy()


def test_a_large_upload_reads_its_413_instead_of_a_reset(limited: Meteorit) -> None:
    body = b"[" + b'{"type":"a"},' * 300_000 + b'{"type":"a"}]'  # about 4 MiB, sent at once
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as s:
        s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        try:
            s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may stop reading once it has dropped enough
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 413 ")


def test_oversized_headers_get_431(meteorit: Meteorit) -> None:
    data = raw_exchange(meteorit.port, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 1)
    assert data.startswith(b"HTTP/1.1 431 ")
    assert meteorit.healthy()


# --- Redis availability


def test_redis_down_spools_and_replays_when_back(meteorit: Meteorit, redis: redislib.Redis,
                                                 redis_server: RedisServer) -> None:
    assert meteorit.post({"type": "before"}) == (202, {"accepted": 1})
    redis_server.stop()
    # every worker notices, also one that has nothing to write (its heartbeat LLEN fails)
    wait_until(lambda: len([e for e in meteorit.logs() if e["msg"].startswith("redis unreachable")]) >= 2,
               5, "both workers to notice")
    replies = [meteorit.post({"type": "during", "n": n}) for n in range(6)]
    assert replies == [(202, {"accepted": 1, "spooled": True})] * 6
    assert meteorit.request("GET", "/readyz")[0] == 200  # the spool takes events
    assert meteorit.request("GET", "/healthz")[0] == 200
    redis_server.start()
    wait_until(lambda: sorted(r.get("n", -1) for r in queued(redis)) == list(range(6)), 10,
               "the spooled events to be replayed")
    assert meteorit.post({"type": "after"}) == (202, {"accepted": 1})


# --- the master: respawn, stops, boot failure


def test_killed_worker_is_respawned(meteorit: Meteorit, redis: redislib.Redis) -> None:
    old = meteorit.worker_pids()
    os.kill(old[0], signal.SIGKILL)
    wait_until(lambda: meteorit.worker_pids().get(0) not in (None, old[0]), 10, "a new worker in slot 0")
    wait_until(lambda: len(meteorit.logs("worker serving")) >= 3, 10, "the new worker to serve")
    for _ in range(10):
        assert meteorit.post({"type": "after-kill"})[0] == 202
    assert redis.llen(QUEUE) == 10
    assert meteorit.worker_pids()[1] == old[1]


def test_a_slot_waiting_out_its_respawn_backoff_takes_no_connections(meteorit: Meteorit) -> None:
    for crash in range(4):  # quick crashes: the 4th respawn waits 0.8 s
        pid = meteorit.worker_pids()[1]
        os.kill(pid, signal.SIGKILL)
        if crash < 3:
            wait_until(lambda: meteorit.worker_pids()[1] != pid, 10, "the respawn")
    wait_until(lambda: meteorit.logs("worker killed by SIGKILL; respawning in 0.8s"), 10, "the backoff")
    for _ in range(20):  # slot 1 is empty now: every connection must reach slot 0 at once
        with socket.create_connection(("127.0.0.1", meteorit.port), timeout=0.5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    wait_until(lambda: meteorit.worker_pids()[1] != pid, 10, "the last respawn")


class Load:
    """Threads posting batches over keep-alive connections until stopped; counts what
    got a 202 (acknowledged) and what did not."""

    def __init__(self, port: int, threads: int = 4, batch: int = 5) -> None:
        self.port = port
        self.batch = batch
        self.acknowledged = 0
        self.failed = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _run(self) -> None:
        body = post_bytes(json.dumps([{"type": "load"}] * self.batch).encode())
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    while not self.stop.is_set():
                        s.sendall(body)
                        data = b""
                        while not _complete(data):
                            part = s.recv(65536)
                            if not part:
                                raise ConnectionError("closed")
                            data += part
                        with self.lock:
                            if data.startswith(b"HTTP/1.1 202 "):
                                self.acknowledged += self.batch
                            else:
                                self.failed += 1
            except OSError:
                with self.lock:
                    self.failed += 1
                if self.stop.wait(0.01):
                    return


def test_quit_under_load_keeps_every_acknowledged_event(meteorit: Meteorit, redis: redislib.Redis) -> None:
    with Load(meteorit.port) as load:
        wait_until(lambda: load.acknowledged >= 2000, 20, "load to get going")
        meteorit.signal(signal.SIGQUIT)
        assert meteorit.wait() == 0
    accepted = sum(e["events_accepted"] for e in meteorit.logs("worker exits"))
    assert load.acknowledged >= 2000
    assert redis.llen(QUEUE) == accepted >= load.acknowledged


def test_term_stops_fast(meteorit: Meteorit) -> None:
    meteorit.signal(signal.SIGTERM)
    assert meteorit.wait(timeout=15) == 0
    assert len(meteorit.logs("worker exits")) == 2


def test_ttin_ttou_change_the_worker_count(meteorit: Meteorit) -> None:
    meteorit.signal(signal.SIGTTIN)
    wait_until(lambda: len(meteorit.logs("worker serving")) >= 3, 10, "a third worker")
    meteorit.signal(signal.SIGTTOU)
    wait_until(lambda: len(meteorit.logs("worker exits")) >= 1, 10, "the third worker to stop")
    assert meteorit.logs("worker exits")[0]["slot"] == 2
    # no connection is routed to the listening socket of the slot that went away
    for _ in range(50):
        assert meteorit.request("GET", "/healthz")[0] == 200


def test_connections_are_spread_over_the_workers(meteorit: Meteorit) -> None:
    """With one SO_REUSEPORT socket per worker the kernel balances a burst of connects;
    a shared socket let one worker accept all of them."""
    conns = [socket.create_connection(("127.0.0.1", meteorit.port), timeout=10) for _ in range(64)]
    try:
        for c in conns:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        for c in conns:
            assert c.recv(4096).startswith(b"HTTP/1.1 200 ")
    finally:
        for c in conns:
            c.close()
    meteorit.signal(signal.SIGQUIT)
    assert meteorit.wait() == 0
    served = [e["requests"].get("200", 0) for e in meteorit.logs("worker exits")]
    assert sum(served) >= 64 and min(served) >= 10, served


def test_quit_during_worker_boot_is_a_clean_stop(meteorit_factory: Callable[..., Meteorit]) -> None:
    with socket.socket() as mute:  # a "Redis" that accepts and never answers: boot waits on PING
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        m = meteorit_factory({"redis": {"url": f"redis://127.0.0.1:{mute.getsockname()[1]}",
                                        "timeout": 5}}, start=False)
        m.start(wait=False)
        wait_until(lambda: len(m.logs("worker started")) == 2, 10, "both workers forked")
        m.signal(signal.SIGQUIT)
        assert m.wait(timeout=30) == 0
    assert len(m.logs("stopped during boot")) == 2
    assert not any("failed to boot" in e["msg"] for e in m.logs())


def test_worker_that_cannot_boot_stops_the_master(meteorit_factory: Callable[..., Meteorit],
                                                  redis_server: RedisServer) -> None:
    m = meteorit_factory({"redis": {"url": redis_server.url}}, start=False)
    sabotage = ("import sys, meteorit.worker.process as w\n"
                "def boom(self): raise RuntimeError('no loop for you')\n"
                "w.Worker._boot = boom\n"
                "from meteorit.cli import main\n"
                f"sys.exit(main(['-c', {str(m.config)!r}]))\n")
    m.start([sys.executable, "-c", sabotage], wait=False)
    assert m.wait(timeout=20) == 1
    assert any("failed to boot" in e["msg"] for e in m.logs())
    assert len(m.logs("worker started")) == 2  # no fork loop


def test_config_check_names_key_and_reason(tmp_path: Path) -> None:
    import subprocess
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nmax_body = -5\n')
    result = subprocess.run([*METEORIT, "-t", "-c", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "limits.max_body" in result.stderr and "positive" in result.stderr


# --- the embedded Redis of the README's run command


def test_embedded_redis(meteorit_factory: Callable[..., Meteorit], tmp_path: Path) -> None:
    data_dir = tmp_path / "redis-data"
    m = meteorit_factory({"redis": {"url": "embedded", "data_dir": str(data_dir)}}, start=False)
    try:
        m.start()
        assert m.post([{"type": "e"}] * 3) == (202, {"accepted": 3})
        client = redislib.Redis(unix_socket_path=str(data_dir / "redis.sock"))
        assert client.llen(QUEUE) == 3
        assert client.config_get("appendonly")["appendonly"] in ("yes", b"yes")
        redis_pid = int((data_dir / "redis.pid").read_text())
        m.signal(signal.SIGQUIT)
        assert m.wait() == 0
        with pytest.raises(ProcessLookupError):
            os.kill(redis_pid, 0)
        # restarted on the same data directory, the events are still there (AOF)
        m.start()
        assert client.llen(QUEUE) == 3
    finally:
        pid_file = data_dir / "redis.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def open_files(pid: int) -> set[str]:
    """What /proc says each descriptor of `pid` points at (paths, `socket:[INODE]`, ...)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass  # closed meanwhile
    return found


def unix_sockets_bound_at(path: str) -> set[str]:
    """`socket:[INODE]` of every socket bound at `path` as spelled at bind() (/proc/net/unix:
    a relative path may be another test's too)."""
    lines = [line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:]]
    return {f"socket:[{fields[6]}]" for fields in lines if len(fields) == 8 and fields[7] == path}


def test_workers_keep_none_of_the_masters_own_descriptors(meteorit_factory: Callable[..., Meteorit],
                                                          tmp_path: Path) -> None:
    """A worker outliving its master must not hold the pid file's or the embedded Redis'
    lock against the next start, nor accept meteoritctl on the control socket."""
    data_dir, pid_file = tmp_path / "redis-data", tmp_path / "meteorit.pid"
    m = meteorit_factory({"redis": {"url": "embedded", "data_dir": str(data_dir)},
                          "server": {"pid_file": str(pid_file)}}, start=False)
    try:
        m.start()
        assert m.proc is not None
        master = open_files(m.proc.pid)
        (control,) = unix_sockets_bound_at("var/run/meteorit.sock") & master  # control.socket, relative
        masters_own = {str(pid_file), str(data_dir / "meteorit.lock"), control}
        assert masters_own <= master  # the names are right: the master holds them
        for slot, pid in m.worker_pids().items():
            assert open_files(pid) & masters_own == set(), f"worker {slot}"
    finally:
        redis_pid_file = data_dir / "redis.pid"
        if redis_pid_file.exists():
            try:
                os.kill(int(redis_pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
