"""End to end, the HTTP layer's hardening: a real master and workers, a real redis-server,
real sockets. Half-closed connections (FIN) and the per-worker budget of buffered request
bodies; the byte-stream fuzz against a real worker is in tests/test_http_fuzz.py."""

from __future__ import annotations

import select
import socket
import time
from typing import Callable

import pytest
import redis as redislib

from conftest import Meteorit, RedisServer, wait_until

QUEUE = "meteorit:events"
pytestmark = pytest.mark.slow
LONG = 60.0  # header_timeout and body_timeout: a test that waits for them fails its socket timeout
SOCKET_TIMEOUT = 10.0


def post_bytes(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            return data
        data += part


def half_close(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send `payload`, then FIN (shutdown SHUT_WR, as `nc -q0` does); what comes back until
    the server closes, and how long that took."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as s:
        s.sendall(payload)
        start = time.monotonic()
        s.shutdown(socket.SHUT_WR)
        data = read_to_eof(s)
        return data, time.monotonic() - start


@pytest.fixture
def patient(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
            redis_server: RedisServer) -> Meteorit:
    """Timeouts far longer than any socket timeout here: a close seen in time came from the FIN."""
    return meteorit_factory({"redis": {"url": redis_server.url}, "server": {"workers": 1},
                             "limits": {"header_timeout": LONG, "body_timeout": LONG}})


def stat(m: Meteorit, key: str) -> int:
    return int(m.ctl_json("stats")["total"].get(key, 0))


# --- a client that half-closes (FIN)


def test_complete_requests_then_fin_get_every_answer_before_the_close(patient: Meteorit,
                                                                       redis: redislib.Redis) -> None:
    requests = [post_bytes(b'[{"type":"fin"},{"type":"fin"}]'), b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
                post_bytes(b'{"type":"fin"}')]
    data, _ = half_close(patient.port, b"".join(requests))
    assert data.count(b"HTTP/1.1 ") == 3
    assert data.startswith(b"HTTP/1.1 202 ") and data.endswith(b'{"accepted":1}')
    assert redis.llen(QUEUE) == 3


@pytest.mark.parametrize("partial", [
    b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Ty",
    post_bytes(b'[{"type":"never"},{"type":"whole"}]')[:-5],
    (b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-ndjson\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n10\r\n{\"type\":\"never\"}\r\n"),
], ids=["headers", "body shorter than Content-Length", "chunked without its last chunk"])
def test_a_partial_request_then_fin_is_closed_at_once_and_counted(patient: Meteorit, redis: redislib.Redis,
                                                                   partial: bytes) -> None:
    before = stat(patient, "requests_abandoned")
    data, waited = half_close(patient.port, post_bytes(b'{"type":"first"}') + partial)
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 202 ")  # the whole one, answered
    assert waited < LONG / 4
    assert redis.llen(QUEUE) == 1
    assert stat(patient, "requests_abandoned") == before + 1
    assert patient.healthy()


# --- the budget of request bodies still arriving (limits.max_buffered_bytes)

SLOW_BODY = 200 * 1024  # five fit in the 1 MiB budget, a sixth does not
SLOW_SENDERS = 8


def padded_events(size: int, events: int = 5) -> bytes:
    """A JSON array of `events` events, `size` bytes long (each well under max_event_size)."""
    bare = [b'{"type":"slow","pad":"%s"}' % b"" for _ in range(events)]
    room = size - (sum(map(len, bare)) + events - 1 + 2)
    pads = [room // events] * events
    pads[-1] += room - sum(pads)
    body = b"[" + b",".join(b'{"type":"slow","pad":"%s"}' % (b"x" * n) for n in pads) + b"]"
    assert len(body) == size
    return body


@pytest.fixture
def budgeted(meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis,
             redis_server: RedisServer) -> Meteorit:
    return meteorit_factory({"redis": {"url": redis_server.url}, "server": {"workers": 1},
                             "limits": {"max_body": "256KiB", "max_buffered_bytes": "1MiB",
                                        "header_timeout": LONG, "body_timeout": LONG}})


def worker_stat(m: Meteorit, key: str) -> int:
    worker, = m.ctl_json("stats")["workers"]
    return int(worker[key])


def test_slow_senders_of_large_bodies_get_503_past_the_budget_while_fast_clients_get_202(
        budgeted: Meteorit, redis: redislib.Redis) -> None:
    body = padded_events(SLOW_BODY)
    request = post_bytes(body)
    senders = [socket.create_connection(("127.0.0.1", budgeted.port), timeout=SOCKET_TIMEOUT)
               for _ in range(SLOW_SENDERS)]
    try:
        for s in senders:
            s.sendall(request[:len(request) - len(body) + 1000])  # headers and 1000 bytes of the body
        wait_until(lambda: worker_stat(budgeted, "body_buffer_bytes") == 5 * SLOW_BODY, 10,
                   "five bodies admitted")
        wait_until(lambda: len(select.select(senders, [], [], 0.1)[0]) >= SLOW_SENDERS - 5, 10, "the refusals")
        refused = select.select(senders, [], [], 0)[0]
        assert len(refused) == SLOW_SENDERS - 5
        for s in refused:
            head = read_to_eof(s).split(b"\r\n\r\n", 1)[0]
            assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head and b"Connection: close" in head
        for _ in range(20):  # the budget is spent, and small requests do not notice
            assert budgeted.post({"type": "fast"})[0] == 202
        admitted = [s for s in senders if s not in refused]
        for s in admitted:
            rest = request[len(request) - len(body) + 1000:]
            for i in range(0, len(rest), 50_000):
                s.sendall(rest[i:i + 50_000])
        for s in admitted:
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 202 ") and answer.endswith(b'{"accepted":5}')
    finally:
        for s in senders:
            s.close()
    assert redis.llen(QUEUE) == 20 + 5 * 5
    assert worker_stat(budgeted, "body_buffer_bytes") == 0
    assert stat(budgeted, "body_buffer_refused") == SLOW_SENDERS - 5
