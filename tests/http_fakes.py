"""Fakes for driving HttpProtocol without sockets: a transport that records what the
protocol writes and how it drives reading, an app that answers at once or holds exchanges
to answer later, and a parser of the bytes a client would read back. Shared by the HTTP
protocol's unit, flow-control and fuzz tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator

from meteorit.worker.exchange import Exchange, ServerState
from meteorit.worker.http import HttpProtocol

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def make_limits(**overrides: Any) -> SimpleNamespace:
    limits = dict(max_header_size=1024, max_headers=10, max_body=100, max_pipeline=4,
                  max_connections=8, header_timeout=10.0, body_timeout=30.0, keepalive_timeout=75.0,
                  max_buffered_bytes=64 * 1024 * 1024)
    limits.update(overrides)
    return SimpleNamespace(**limits)


# --- fakes at the OS boundary


class FakeTransport:
    def __init__(self) -> None:
        self.data = b""
        self.calls: list[str] = []  # pause_reading, resume_reading, close, abort
        self.closed = False
        self.writes_after_close = 0

    def write(self, data: bytes) -> None:
        if self.closed:
            self.writes_after_close += 1
        self.data += data

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def can_write_eof(self) -> bool:
        return False  # as a transport without half-close; HalfCloseTransport has it

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    @property
    def reading(self) -> bool:
        """False while the last pause_reading has not been undone."""
        flow = [c for c in self.calls if c.endswith("_reading")]
        return not flow or flow[-1] == "resume_reading"


class HalfCloseTransport(FakeTransport):
    def can_write_eof(self) -> bool:
        return True


@dataclass
class Request:
    method: bytes
    url: bytes
    headers: dict[bytes, bytes]
    body: bytes


class FakeApp:
    """Answers 200 with the request's url as the body, at once or when told to."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.requests: list[Request] = []
        self.held: list[Exchange] = []

    def dispatch(self, exchange: Exchange, method: bytes, url: bytes,
                 headers: dict[bytes, bytes], body: bytes) -> None:
        self.requests.append(Request(method, url, dict(headers), body))
        if self.hold:
            self.held.append(exchange)
        else:
            exchange.reply(200, url)

    def answer(self, index: int, status: int = 200) -> None:
        self.held[index].reply(status, self.requests[index].url)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_responses(data: bytes) -> list[Response]:
    """Split the bytes written into whole responses; fail on anything left over."""
    responses = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head!r}"
        status_line, *lines = head.decode().split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        assert len(data) >= length, "body shorter than its Content-Length"
        responses.append(Response(int(status), headers, data[:length]))
        data = data[length:]
    return responses


class Client:
    """One connection: what the peer sends in, what it reads back."""

    def __init__(self, state: ServerState) -> None:
        self.transport = FakeTransport()
        self.protocol = HttpProtocol(state)
        self.protocol.connection_made(self.transport)

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.data_received(chunk)

    @property
    def responses(self) -> list[Response]:
        return parse_responses(self.transport.data)

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    @property
    def closed(self) -> bool:
        return self.transport.closed


def post(body: bytes = b'{"type":"click"}', url: bytes = b"/v1/events", extra: bytes = b"",
         version: bytes = b"1.1") -> bytes:
    return (b"POST %s HTTP/%s\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (url, version, len(body), extra, body))


def get(url: bytes = b"/healthz", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET %s HTTP/%s\r\nHost: t\r\n%s\r\n" % (url, version, extra)


def chunked_post(chunks: list[bytes], url: bytes = b"/v1/events") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%s" % (url, body))


@dataclass
class Server:
    app: FakeApp
    state: ServerState
    clients: list[Client] = field(default_factory=list)

    def connect(self) -> Client:
        client = Client(self.state)
        self.clients.append(client)
        return client


def make_server(hold: bool = False, **limits: Any) -> Server:
    app = FakeApp(hold)
    return Server(app, ServerState(app, make_limits(**limits)))


def serve(hold: bool) -> Iterator[Server]:
    s = make_server(hold)
    yield s
    # asyncio drops writes to a closing transport: whatever is written then is lost
    assert [c.transport.writes_after_close for c in s.clients] == [0] * len(s.clients)
