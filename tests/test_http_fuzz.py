"""Fuzzing the HTTP layer over the raw byte stream (hypothesis).

Against HttpProtocol with fake transports (tests/http_fakes.py), many cases: valid
pipelined requests in any chunking, cut anywhere and followed by FIN; the same bytes
corrupted; several connections interleaved over one small body budget. Whatever the
bytes, every outcome is whole responses or a close, never a 5xx other than 503, nothing
partial reaches the app, and every byte held in the budget comes back.

Against a real worker and a real Redis, a bounded number of socket conversations: LLEN
only ever grows by the events of requests answered 202."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from time import monotonic
from typing import Callable

import pytest
import redis as redislib
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Meteorit, RedisServer
from http_fakes import FakeTransport, HalfCloseTransport, make_limits, parse_responses
from meteorit.worker.exchange import Exchange, ServerState
from meteorit.worker.http import HttpProtocol

MAX_BODY = 100
BUDGET = 250
FAST = settings(max_examples=300, deadline=None)  # bounded: the suite stays fast


# --- the requests: bytes on the wire and what the app must receive for them


@dataclass(frozen=True)
class Wire:
    data: bytes
    method: bytes
    url: bytes
    body: bytes


def cl_post(url: bytes, body: bytes, pad: bytes) -> Wire:
    return Wire(b"POST %s HTTP/1.1\r\nHost: t\r\nX-Pad: %s\r\nContent-Length: %d\r\n\r\n%s"
                % (url, pad, len(body), body), b"POST", url, body)


def chunked_post(url: bytes, chunks: list[bytes], pad: bytes) -> Wire:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
    return Wire(b"POST %s HTTP/1.1\r\nHost: t\r\nX-Pad: %s\r\nTransfer-Encoding: chunked\r\n\r\n%s"
                % (url, pad, framed), b"POST", url, b"".join(chunks))


def get(url: bytes, pad: bytes) -> Wire:
    return Wire(b"GET %s HTTP/1.1\r\nHost: t\r\nX-Pad: %s\r\n\r\n" % (url, pad), b"GET", url, b"")


pads = st.binary(max_size=40).map(lambda b: b.hex().encode()[:40])


@st.composite
def wire_requests(draw: st.DrawFn, url: bytes, min_body: int = 0) -> Wire:
    kind = draw(st.sampled_from(["cl", "chunked", "get"]))
    pad = draw(pads)
    if kind == "cl":
        return cl_post(url, draw(st.binary(min_size=min_body, max_size=MAX_BODY)), pad)
    if kind == "chunked":
        piece = st.binary(min_size=max(1, min_body // 3), max_size=40)
        chunks = draw(st.lists(piece, min_size=min(3, min_body), max_size=4).filter(
            lambda cs: sum(map(len, cs)) <= MAX_BODY))
        return chunked_post(url, chunks, pad)
    return get(url, pad)


@st.composite
def pipelines(draw: st.DrawFn, max_size: int = 6, min_body: int = 0) -> list[Wire]:
    count = draw(st.integers(1, max_size))
    return [draw(wire_requests(b"/%d" % i, min_body)) for i in range(count)]


def split(data: bytes, cuts: set[int]) -> list[bytes]:
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` in reads of these sizes (the last size repeats)."""
    out: list[bytes] = []
    at = 0
    while at < len(data):
        size = sizes[min(len(out), len(sizes) - 1)]
        out.append(data[at:at + size])
        at += size
    return out


# --- a connection driven as asyncio would


@dataclass
class Seen:
    protocol: HttpProtocol
    method: bytes
    url: bytes
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class RecordingApp:
    """Records what it receives; answers at once, or holds until the driver answers."""
    hold: bool = False
    seen: list[Seen] = field(default_factory=list)
    held: list[tuple[Exchange, bytes]] = field(default_factory=list)  # and the url, its answer

    def dispatch(self, exchange: Exchange, method: bytes, url: bytes,
                 headers: dict[bytes, bytes], body: bytes) -> None:
        self.seen.append(Seen(exchange.protocol, method, url, dict(headers), body))
        if self.hold:
            self.held.append((exchange, url))
        else:
            exchange.reply(200, url)


class Conn:
    def __init__(self, state: ServerState, half_close: bool) -> None:
        self.transport = HalfCloseTransport() if half_close else FakeTransport()
        self.protocol = HttpProtocol(state)
        self.protocol.connection_made(self.transport)
        self.gone = False

    @property
    def can_read(self) -> bool:
        return not self.gone and self.transport.reading

    def feed(self, chunk: bytes) -> None:
        self.protocol.data_received(chunk)
        self.settle()

    def eof(self) -> None:
        if not self.gone and not self.transport.closed:
            self.protocol.eof_received()
        self.settle()

    def settle(self) -> None:
        """A closed transport ends in connection_lost, as the loop does on its next turn."""
        if self.transport.closed and not self.gone:
            self.gone = True
            self.protocol.connection_lost(None)


def answer_one(app: RecordingApp, pick: int) -> None:
    exchange, url = app.held.pop(pick % len(app.held))
    exchange.reply(200, url)


def check_outcome(conn: Conn) -> list[int]:
    """Whole responses, none a 5xx but 503; no write after the close; the statuses."""
    statuses = [r.status for r in parse_responses(conn.transport.data)]
    assert not [s for s in statuses if s >= 500 and s != 503], statuses
    assert conn.transport.writes_after_close == 0
    return statuses


def check_budget(state: ServerState, conns: list[Conn], last: Conn) -> None:
    """After `last` read: what the budget holds is what the connections hold, those with a
    Content-Length never reserve past the limit, a connection between requests, failed or
    gone holds nothing, a chunked body that took the budget over stops reading, and none
    stays paused once there is room."""
    protocols = [c.protocol for c in conns]
    assert state.budget.held == sum(p.held for p in protocols)
    assert sum(p.held for p in protocols if p.admitted and not p.grows) <= state.limits.max_buffered_bytes
    assert not [p for p in protocols if (p.failed or p.lost or not p.in_message) and p.held]
    assert state.budget.over or not [p for p in protocols if p.budget_paused]  # room wakes them all
    p = last.protocol
    if p.admitted and p.grows and state.budget.over:
        assert not last.transport.reading


def check_released(state: ServerState) -> None:
    assert state.budget.held == 0 and not state.budget.waiting
    assert state.connections == set()


# --- valid pipelines, any chunking, cut anywhere, then FIN


@FAST
@given(pipeline=pipelines(), data=st.data())
def test_a_pipeline_cut_anywhere_then_fin_answers_exactly_the_whole_requests(pipeline: list[Wire],
                                                                             data: st.DataObject) -> None:
    stream = b"".join(w.data for w in pipeline)
    cut = data.draw(st.integers(0, len(stream)), label="cut")
    chunks = split(stream[:cut], data.draw(st.sets(st.integers(1, max(1, cut)), max_size=12), label="splits"))
    app = RecordingApp(hold=data.draw(st.booleans(), label="hold"))
    state = ServerState(app, make_limits(max_pipeline=3, max_buffered_bytes=BUDGET))
    conn = Conn(state, half_close=data.draw(st.booleans(), label="half_close"))
    for chunk in chunks:
        while not conn.can_read:  # paused for the pipeline: the app answers, in any order
            answer_one(app, data.draw(st.integers(0, 10), label="answer"))
        conn.feed(chunk)
    conn.eof()
    while app.held:
        answer_one(app, data.draw(st.integers(0, 10), label="answer"))
    conn.settle()

    ends = [sum(len(w.data) for w in pipeline[:i + 1]) for i in range(len(pipeline))]
    whole = [w for w, end in zip(pipeline, ends) if end <= cut]
    assert [(s.method, s.url, s.body) for s in app.seen] == [(w.method, w.url, w.body) for w in whole]
    assert check_outcome(conn) == [200] * len(whole)
    assert [r.body for r in parse_responses(conn.transport.data)] == [w.url for w in whole]
    assert conn.gone  # FIN: closed once the whole requests are answered
    started = [end - len(w.data) for w, end in zip(pipeline, ends)]
    inside = any(start < cut < end for start, end in zip(started, ends))
    assert state.abandoned == (1 if inside else 0)
    check_released(state)


# --- the same bytes, corrupted


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    stream = bytearray(b"".join(w.data for w in draw(pipelines())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(stream)))
        how = draw(st.sampled_from(["replace", "insert", "delete"]))
        junk = draw(st.binary(min_size=1, max_size=3) | st.sampled_from(
            [b"\r\n", b"\r\n\r\n", b":", b" ", b"\x00", b"0", b"9", b"-", b"chunked", b"Content-Length: 7\r\n"]))
        if how == "insert":
            stream[at:at] = junk
        elif how == "replace":
            stream[at:at + len(junk)] = junk
        else:
            del stream[at:at + len(junk)]
    return bytes(stream)


@FAST
@given(stream=corrupted(), data=st.data())
def test_corrupted_bytes_get_whole_responses_or_a_close_and_never_a_partial_request(
        stream: bytes, data: st.DataObject) -> None:
    app = RecordingApp()
    budget = data.draw(st.sampled_from([BUDGET, 64 * 1024 * 1024]), label="budget")
    state = ServerState(app, make_limits(max_pipeline=3, max_buffered_bytes=budget))
    conn = Conn(state, half_close=data.draw(st.booleans(), label="half_close"))
    for chunk in split(stream, data.draw(st.sets(st.integers(1, max(1, len(stream))), max_size=12), label="splits")):
        if not conn.can_read:
            break  # failed or closing: the rest is never read
        conn.feed(chunk)
        check_budget(state, [conn], conn)
        if data.draw(st.integers(0, 9), label="tick") == 0:
            conn.protocol.check_timeout(monotonic() + 1000)  # past every timeout: 408 or close
            conn.settle()
            check_budget(state, [conn], conn)
    conn.eof()
    conn.settle()
    statuses = check_outcome(conn)
    assert set(statuses) <= {200, 400, 408, 413, 431, 503}, statuses
    assert conn.gone
    for seen in app.seen:  # framed whole: a body is never cut short of its Content-Length
        length = seen.headers.get(b"content-length")
        if length is not None and length.isdigit():
            assert len(seen.body) == int(length)
        assert len(seen.body) <= MAX_BODY
    assert statuses.count(200) == len(app.seen)
    check_released(state)


# --- several connections over one budget


@settings(max_examples=150, deadline=None)  # each example drives up to 5 connections
@given(pipes=st.lists(pipelines(max_size=3, min_body=30), min_size=2, max_size=5), data=st.data())
def test_connections_sharing_a_budget_all_end_and_give_back_every_byte(pipes: list[list[Wire]],
                                                                        data: st.DataObject) -> None:
    app = RecordingApp()
    state = ServerState(app, make_limits(max_buffered_bytes=MAX_BODY))  # one whole body: often over
    conns = [Conn(state, half_close=False) for _ in pipes]
    reads = st.lists(st.integers(1, 60), min_size=1, max_size=8)  # small reads: bodies overlap
    streams = [pieces(b"".join(w.data for w in p), data.draw(reads, label="reads")) for p in pipes]
    max_read = max((len(c) for s in streams for c in s), default=0)
    while any(streams):
        ready = [i for i, s in enumerate(streams) if s and conns[i].can_read]
        if not ready:
            # every connection with bytes to send waits for room: only the body timeout
            # can end this, as in a real worker
            assert state.budget.over
            for conn in conns:
                conn.protocol.check_timeout(monotonic() + 1000)
                conn.settle()
            streams = [s if conns[i].can_read else [] for i, s in enumerate(streams)]
            continue
        i = data.draw(st.sampled_from(ready), label="next connection")
        conns[i].feed(streams[i].pop(0))
        if conns[i].gone:
            streams[i] = []
        check_budget(state, conns, conns[i])
        assert state.budget.held <= MAX_BODY + max_read * len(conns)
    for conn in conns:
        conn.eof()
    for conn, pipe in zip(conns, pipes):
        statuses = check_outcome(conn)
        assert set(statuses) <= {200, 408, 503}
        got = [(s.url, s.body) for s in app.seen if s.protocol is conn.protocol]
        assert got == [(w.url, w.body) for w in pipe[:len(got)]]  # in order, whole
        if 503 not in statuses and 408 not in statuses:
            assert len(got) == len(pipe)
        assert conn.gone
    check_released(state)


# --- a real worker, a real Redis: each example one socket conversation

QUEUE = "meteorit:events"


@st.composite
def event_requests(draw: st.DrawFn) -> tuple[bytes, int]:
    """One request on the wire and the events it carries (0 for a GET)."""
    kind = draw(st.sampled_from(["json", "ndjson-chunked", "get"]))
    events = [{"type": "fuzz", "n": draw(st.integers(0, 999))} for _ in range(draw(st.integers(1, 3)))]
    if kind == "get":
        return b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", 0
    if kind == "json":
        body = json.dumps(events).encode()
        return (b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)), len(events)
    lines = [json.dumps(e).encode() + b"\n" for e in events]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines) + b"0\r\n\r\n"
    return (b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%s" % framed), len(events)


def responses_of(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each whole response; the bytes must be nothing else."""
    return [(r.status, r.body) for r in parse_responses(data)]


def converse(port: int, chunks: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # it answered an error and closed: read what it said
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        data = b""
        while part := s.recv(65536):
            data += part
        return data


@pytest.mark.slow
def test_a_real_worker_fed_fuzzed_streams_queues_only_requests_it_answered_202(
        meteorit_factory: Callable[..., Meteorit], redis: redislib.Redis, redis_server: RedisServer) -> None:
    # timeouts past the socket's: a conversation that waited for one would fail
    m = meteorit_factory({"redis": {"url": redis_server.url}, "server": {"workers": 1},
                          "limits": {"header_timeout": 60.0, "body_timeout": 60.0}})
    pids = m.worker_pids()

    @settings(max_examples=40, deadline=None)
    @given(requests=st.lists(event_requests(), min_size=1, max_size=5), data=st.data())
    def conversation(requests: list[tuple[bytes, int]], data: st.DataObject) -> None:
        stream = b"".join(r for r, _ in requests)
        mode = data.draw(st.sampled_from(["whole", "cut", "corrupt"]), label="mode")
        if mode == "cut":
            stream = stream[:data.draw(st.integers(0, len(stream)), label="cut")]
        elif mode == "corrupt":
            corrupt = bytearray(stream)
            for _ in range(data.draw(st.integers(1, 3), label="corruptions")):
                at = data.draw(st.integers(0, len(corrupt) - 1), label="at")
                corrupt[at] = data.draw(st.integers(0, 255), label="byte")
            stream = bytes(corrupt)
        chunks = split(stream, data.draw(st.sets(st.integers(1, max(1, len(stream))), max_size=6), label="splits"))
        before = redis.llen(QUEUE)
        answers = responses_of(converse(m.port, chunks))
        grown = redis.llen(QUEUE) - before
        assert not [s for s, _ in answers if s >= 500 and s != 503], answers
        accepted = sum(json.loads(body)["accepted"] for status, body in answers if status == 202)
        assert grown == accepted  # nothing in Redis that was not answered 202, nothing partly
        if mode == "whole":
            assert [s for s, _ in answers] == [202 if n else 200 for _, n in requests]
            assert accepted == sum(n for _, n in requests)
        elif mode == "cut":
            ends = [sum(len(w) for w, _ in requests[:i + 1]) for i in range(len(requests))]
            assert accepted == sum(n for (_, n), end in zip(requests, ends) if end <= len(stream))

    conversation()
    assert m.healthy() and m.worker_pids() == pids  # the worker never crashed
    assert [e["msg"] for e in m.logs() if e.get("level") in ("error", "critical")] == []
