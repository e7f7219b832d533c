"""The per-worker budget of buffered request bodies (`limits.max_buffered_bytes`), driven
through HttpProtocol with fake transports (tests/http_fakes.py): what slow senders may
hold, who gets 503, which connection pauses and when it reads again."""

from __future__ import annotations

from time import monotonic
from typing import Callable

import pytest

from http_fakes import Client, HalfCloseTransport, Server, get, make_server, post
from meteorit.worker.http import HttpProtocol

BUDGET = 250  # with max_body = 100 (tests/http_fakes.make_limits): two whole bodies and a half


def head(length: int, url: bytes = b"/v1/events", extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n" % (url, length, extra)


CHUNKED_HEAD = b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


@pytest.fixture
def budgeted() -> Server:
    return make_server(max_buffered_bytes=BUDGET)


def slow_sender(server: Server, length: int = 100, sent: int = 10, url: bytes = b"/slow") -> Client:
    """Headers and the first `sent` bytes of a body of `length`: the rest is still to come."""
    client = server.connect()
    client.send(head(length, url) + b"s" * sent)
    return client


def held(server: Server) -> int:
    return server.state.budget.held


def test_a_body_still_arriving_reserves_its_content_length_until_it_reaches_the_app(budgeted: Server) -> None:
    client = slow_sender(budgeted, 80)
    assert held(budgeted) == 80
    client.send(b"s" * 60)
    assert held(budgeted) == 80 and budgeted.app.requests == []
    client.send(b"s" * 10)
    assert client.statuses == [200] and budgeted.app.requests[0].body == b"s" * 80
    assert held(budgeted) == 0


def test_a_body_that_would_pass_the_budget_gets_503_and_those_being_read_finish(budgeted: Server) -> None:
    first, second = slow_sender(budgeted, url=b"/1"), slow_sender(budgeted, url=b"/2")
    assert held(budgeted) == 200
    third = slow_sender(budgeted, 60, url=b"/3")  # 260 would pass 250
    response, = third.responses
    assert (response.status, response.headers["retry-after"], response.headers["connection"]) == (503, "1", "close")
    assert third.closed
    assert (budgeted.state.budget.refused, budgeted.state.errors[503]) == (1, 1)
    first.send(b"s" * 90)
    second.send(b"s" * 90)
    assert first.statuses == [200] and second.statuses == [200]
    assert [r.url for r in budgeted.app.requests] == [b"/1", b"/2"]  # nothing of /3
    assert held(budgeted) == 0
    slow_sender(budgeted, url=b"/4")  # room again
    assert held(budgeted) == 100


def test_a_body_that_arrives_with_its_headers_never_meets_the_budget(budgeted: Server) -> None:
    slow_sender(budgeted), slow_sender(budgeted)  # 200 of 250 held
    fast = budgeted.connect()
    for _ in range(5):
        fast.send(post(b"f" * 100))  # 100 more would not fit, but it is never held
    assert fast.statuses == [200] * 5
    assert held(budgeted) == 200 and budgeted.state.budget.refused == 0


def test_the_budget_503_comes_after_the_answers_owed_on_the_connection(budgeted: Server) -> None:
    slow_sender(budgeted), slow_sender(budgeted)
    client = budgeted.connect()
    client.send(get(b"/first") + head(100) + b"x")
    assert client.statuses == [200, 503] and client.closed


def test_expect_100_continue_without_room_gets_503_and_no_interim_response(budgeted: Server) -> None:
    slow_sender(budgeted), slow_sender(budgeted)
    client = budgeted.connect()
    client.send(head(100, extra=b"Expect: 100-continue\r\n"))
    assert client.transport.data.startswith(b"HTTP/1.1 503 ")
    with_room = make_server(max_buffered_bytes=BUDGET).connect()
    with_room.send(head(100, extra=b"Expect: 100-continue\r\n"))
    assert with_room.transport.data == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_a_chunked_body_pauses_reading_while_over_the_budget_and_resumes_when_room_is_made(
        budgeted: Server) -> None:
    first, _ = slow_sender(budgeted, url=b"/1"), slow_sender(budgeted, url=b"/2")
    chunked = budgeted.connect()
    chunked.send(CHUNKED_HEAD + chunk(b"c" * 40))
    assert held(budgeted) == 240 and chunked.transport.reading
    chunked.send(chunk(b"c" * 40))  # 280: over, and it has no length to be refused up front
    assert held(budgeted) == 280 and not chunked.transport.reading
    assert first.transport.reading  # a body with a Content-Length has its room: never paused
    first.send(b"s" * 90)  # /1 reaches the app: 180 held
    assert chunked.transport.reading
    chunked.send(LAST_CHUNK)
    assert chunked.statuses == [200] and budgeted.app.requests[-1].body == b"c" * 80
    assert held(budgeted) == 100


def test_a_chunked_body_refused_up_front_when_the_budget_is_already_over(budgeted: Server) -> None:
    slow_sender(budgeted), slow_sender(budgeted)
    growing = budgeted.connect()
    growing.send(CHUNKED_HEAD + chunk(b"c" * 40), chunk(b"c" * 40))  # 280
    late = budgeted.connect()
    late.send(CHUNKED_HEAD + chunk(b"l"))
    assert late.statuses == [503]


def test_a_chunked_body_paused_for_room_still_times_out(budgeted: Server) -> None:
    slow_sender(budgeted), slow_sender(budgeted)
    chunked = budgeted.connect()
    chunked.send(CHUNKED_HEAD + chunk(b"c" * 40), chunk(b"c" * 40))
    assert not chunked.transport.reading
    chunked.protocol.check_timeout(monotonic() + 31)  # body_timeout is 30
    assert chunked.statuses == [408] and chunked.closed
    assert held(budgeted) == 200 and not budgeted.state.budget.waiting


def _lost(client: Client) -> None:
    client.transport.close()
    client.protocol.connection_lost(None)


ENDINGS: dict[str, Callable[[Client], None]] = {
    "connection lost": _lost,
    "client FIN": lambda c: c.protocol.eof_received(),
    "body timeout": lambda c: c.protocol.check_timeout(monotonic() + 31),
    "chunked body over max_body": lambda c: c.send(chunk(b"x" * 90)),
}


@pytest.mark.parametrize("end", ENDINGS.values(), ids=ENDINGS.keys())
def test_bytes_held_are_given_back_however_the_request_ends(budgeted: Server, end: Callable[[Client], None]) -> None:
    slow_sender(budgeted), slow_sender(budgeted)
    client = budgeted.connect()
    client.send(CHUNKED_HEAD + chunk(b"c" * 40))  # 240
    paused = budgeted.connect()
    paused.send(CHUNKED_HEAD + chunk(b"p" * 5), chunk(b"p" * 15))  # admitted at 245, then 260: over
    assert not paused.transport.reading
    end(client)
    assert held(budgeted) == 220  # the two slow senders and `paused`
    assert paused.transport.reading and list(budgeted.state.budget.waiting) == []


def test_a_connection_refused_for_room_drops_its_upload_without_holding_it() -> None:
    server = make_server(max_buffered_bytes=BUDGET)
    slow_sender(server), slow_sender(server)
    protocol = HttpProtocol(server.state)
    transport = HalfCloseTransport()
    protocol.connection_made(transport)
    protocol.data_received(head(100) + b"x" * 10)
    assert transport.data.startswith(b"HTTP/1.1 503 ") and transport.calls[-1] == "write_eof"
    protocol.data_received(b"x" * 90)  # read and dropped
    assert held(server) == 200 and server.app.requests == []


def test_a_hot_reload_of_the_budget_applies_to_the_next_body(budgeted: Server) -> None:
    budgeted.state.limits.max_buffered_bytes = 50  # process.py updates this object in place
    assert slow_sender(budgeted, 60).statuses == [503]
    budgeted.state.limits.max_buffered_bytes = 1000
    slow_sender(budgeted, 60)
    assert held(budgeted) == 60
