"""HttpProtocol without sockets: a fake transport records what the protocol writes and how
it drives reading; a fake app answers at once or holds exchanges to answer later, in any
order (tests/http_fakes.py). Assertions are on the bytes a client would read."""

from __future__ import annotations

from time import monotonic
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from http_fakes import (CONTINUE, Client, FakeApp, FakeTransport, HalfCloseTransport, Request, Server,
                        chunked_post, get, make_limits, make_server, parse_responses, post, serve)
from meteorit.worker.exchange import KEPT_HEADERS, Exchange, ServerState
from meteorit.worker.http import HttpProtocol


@pytest.fixture
def server() -> Iterator[Server]:
    """A server whose app answers every request at once."""
    yield from serve(hold=False)


@pytest.fixture
def holding() -> Iterator[Server]:
    """A server whose app answers only when the test says so."""
    yield from serve(hold=True)


# --- parsing: what the app receives does not depend on how the bytes arrive

BODY = b'{"type":"click","page":"/a?b=c"}'
REQUEST = post(BODY, url=b"/v1/events?source=web",
               extra=b"X-Api-Key: k1\r\nUser-Agent: test\r\nAuthorization: Bearer t\r\n")
EXPECTED = Request(b"POST", b"/v1/events?source=web", {
    b"content-type": b"application/json", b"content-length": b"%d" % len(BODY),
    b"x-api-key": b"k1", b"authorization": b"Bearer t"}, BODY)


def test_app_receives_method_url_kept_headers_and_body(server: Server) -> None:
    client = server.connect()
    client.send(REQUEST)
    assert server.app.requests == [EXPECTED]  # Host and User-Agent are not kept
    assert client.statuses == [200]
    assert client.responses[0].body == b"/v1/events?source=web"


def test_a_post_split_at_every_byte_boundary_reaches_the_app_unchanged() -> None:
    for cut in range(1, len(REQUEST)):
        s = make_server()
        client = s.connect()
        client.send(REQUEST[:cut], REQUEST[cut:])
        assert s.app.requests == [EXPECTED], f"split at {cut}"
        assert client.statuses == [200], f"split at {cut}"


def test_a_post_fed_one_byte_at_a_time_reaches_the_app_unchanged(server: Server) -> None:
    client = server.connect()
    client.send(*(REQUEST[i:i + 1] for i in range(len(REQUEST))))
    assert server.app.requests == [EXPECTED]
    assert client.statuses == [200]


def test_a_chunked_body_split_at_every_byte_boundary_is_joined() -> None:
    data = chunked_post([b'{"type":"a"}\n', b'{"type":"b"}\n'])
    for cut in range(1, len(data)):
        s = make_server()
        s.connect().send(data[:cut], data[cut:])
        assert [r.body for r in s.app.requests] == [b'{"type":"a"}\n{"type":"b"}\n'], f"split at {cut}"


PIPELINE = [post(b'{"type":"a"}', url=b"/1"), get(b"/2"), chunked_post([b"x" * 7, b"y"], url=b"/3"),
            post(b"", url=b"/4")]


@settings(max_examples=300)
@given(st.sets(st.integers(1, len(b"".join(PIPELINE)) - 1), max_size=40))
def test_pipelined_requests_in_any_chunking_reach_the_app_in_order(cuts: set[int]) -> None:
    data = b"".join(PIPELINE)
    bounds = [0, *sorted(cuts), len(data)]
    s = make_server()
    client = s.connect()
    client.send(*(data[a:b] for a, b in zip(bounds, bounds[1:])))
    assert [(r.method, r.url, r.body) for r in s.app.requests] == [
        (b"POST", b"/1", b'{"type":"a"}'), (b"GET", b"/2", b""), (b"POST", b"/3", b"xxxxxxxy"),
        (b"POST", b"/4", b"")]
    assert [r.body for r in client.responses] == [b"/1", b"/2", b"/3", b"/4"]
    assert not client.closed


def test_the_app_chooses_further_headers_to_keep_and_forwarded_for_lines_are_joined() -> None:
    app = FakeApp()
    state = ServerState(app, make_limits(), KEPT_HEADERS | {b"user-agent", b"x-forwarded-for"})
    client = Client(state)
    client.send(post(extra=b"User-Agent: ua\r\nReferer: r\r\nX-Forwarded-For: 6.6.6.6\r\n"
                           b"x-forwarded-for: 1.2.3.4, 10.0.0.1\r\nOrigin: https://o.example\r\n"))
    headers = app.requests[0].headers
    assert headers[b"user-agent"] == b"ua" and b"referer" not in headers
    assert headers[b"x-forwarded-for"] == b"6.6.6.6, 1.2.3.4, 10.0.0.1"  # the proxy's hop stays last
    assert headers[b"origin"] == b"https://o.example"  # kept whenever sent: CORS reads it
    state.kept_headers = KEPT_HEADERS  # a hot reload takes effect at the next request
    client.send(post(extra=b"User-Agent: ua\r\n"))
    assert b"user-agent" not in app.requests[1].headers


def test_a_bare_reply_has_no_content_headers() -> None:
    class BareApp(FakeApp):
        def dispatch(self, exchange: Exchange, method: bytes, url: bytes,
                     headers: dict[bytes, bytes], body: bytes) -> None:
            exchange.reply_bare(204, b"Allow: POST, OPTIONS\r\n")

    client = Client(ServerState(BareApp(), make_limits()))
    client.send(b"OPTIONS /v1/events HTTP/1.1\r\nHost: t\r\n\r\n", get())
    data = client.transport.data
    first = data[:data.index(b"\r\n\r\n") + 4]
    assert first.startswith(b"HTTP/1.1 204 No Content\r\n") and b"Allow: POST, OPTIONS\r\n" in first
    assert b"Content-Length" not in first and b"Content-Type" not in first
    assert data.count(b"HTTP/1.1 204 ") == 2 and not client.closed  # keep-alive goes on


def test_the_peer_address_comes_from_the_transport() -> None:
    class PeerTransport(FakeTransport):
        def __init__(self, peer: Any) -> None:
            super().__init__()
            self.peer = peer

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return self.peer if name == "peername" else default

    for peer, address in ((("192.0.2.1", 5000), "192.0.2.1"), (("::1", 5000, 0, 0), "::1"), ("", None)):
        app = FakeApp(hold=True)
        protocol = HttpProtocol(ServerState(app, make_limits()))
        protocol.connection_made(PeerTransport(peer))
        protocol.data_received(get())
        assert app.held[0].peer_address() == address


# --- pipelining and flow control


def test_pipelined_answers_given_out_of_order_are_written_in_request_order(holding: Server) -> None:
    client = holding.connect()
    client.send(get(b"/1") + get(b"/2") + get(b"/3"))
    app = holding.app
    assert len(app.held) == 3
    app.answer(2)
    assert client.transport.data == b""  # /3 is done but /1 and /2 are owed first
    app.answer(0)
    assert [r.body for r in client.responses] == [b"/1"]
    app.answer(1)
    assert [r.body for r in client.responses] == [b"/1", b"/2", b"/3"]
    assert not client.closed


def test_an_exchange_answered_twice_keeps_its_first_answer(holding: Server) -> None:
    client = holding.connect()
    client.send(get(b"/1") + get(b"/2"))
    holding.app.answer(1)
    holding.app.answer(1, status=500)  # while it waits behind /1
    holding.app.answer(0)
    holding.app.answer(0, status=500)  # after it was written
    assert client.statuses == [200, 200]


def test_reading_pauses_while_max_pipeline_requests_wait_and_resumes_when_answered() -> None:
    s = make_server(hold=True, max_pipeline=2)
    client = s.connect()
    client.send(get(b"/1"))
    assert client.transport.reading
    client.send(get(b"/2"))
    assert not client.transport.reading
    s.app.answer(0)
    assert client.transport.reading
    assert client.transport.calls == ["pause_reading", "resume_reading"]


def test_pause_writing_pauses_reading_until_resume_writing(server: Server) -> None:
    client = server.connect()
    client.protocol.pause_writing()
    assert not client.transport.reading
    client.protocol.pause_writing()  # idempotent: no second pause_reading
    client.protocol.resume_writing()
    assert client.transport.reading
    assert client.transport.calls == ["pause_reading", "resume_reading"]


def test_resume_writing_keeps_reading_paused_while_the_pipeline_is_full() -> None:
    s = make_server(hold=True, max_pipeline=1)
    client = s.connect()
    client.protocol.pause_writing()
    client.send(get(b"/1"))
    client.protocol.resume_writing()
    assert not client.transport.reading
    s.app.answer(0)
    assert client.transport.reading


def test_a_client_that_does_not_read_is_aborted_not_closed_gracefully(holding: Server) -> None:
    client = holding.connect()
    client.send(get(b"/1", extra=b"Connection: close\r\n"))
    client.protocol.pause_writing()
    holding.app.answer(0)
    assert "abort" in client.transport.calls and "close" not in client.transport.calls


# --- keep-alive and Connection


def test_http11_keeps_the_connection_open_without_a_connection_header(server: Server) -> None:
    client = server.connect()
    client.send(get(b"/1"))
    client.send(get(b"/2"))
    assert [(r.status, r.headers.get("connection")) for r in client.responses] == [(200, None), (200, None)]
    assert not client.closed


def test_connection_close_is_answered_with_close_and_later_requests_are_ignored(server: Server) -> None:
    client = server.connect()
    client.send(get(b"/1", extra=b"Connection: close\r\n") + get(b"/2"))
    assert [r.url for r in server.app.requests] == [b"/1"]
    assert [(r.status, r.headers.get("connection")) for r in client.responses] == [(200, "close")]
    assert client.closed


def test_http10_without_keep_alive_is_answered_with_close(server: Server) -> None:
    client = server.connect()
    client.send(get(b"/1", version=b"1.0"))
    assert [(r.status, r.headers.get("connection")) for r in client.responses] == [(200, "close")]
    assert client.closed


def test_http10_keep_alive_is_answered_with_keep_alive_and_stays_open(server: Server) -> None:
    client = server.connect()
    client.send(get(b"/1", version=b"1.0", extra=b"Connection: keep-alive\r\n"))
    client.send(get(b"/2", version=b"1.0", extra=b"Connection: keep-alive\r\n"))
    assert [(r.status, r.headers.get("connection")) for r in client.responses] == [
        (200, "keep-alive"), (200, "keep-alive")]
    assert not client.closed


def test_client_eof_closes_after_the_owed_answers(holding: Server) -> None:
    client = holding.connect()
    client.send(get(b"/1"))
    client.protocol.eof_received()
    assert not client.closed
    holding.app.answer(0)
    assert client.statuses == [200]
    assert client.closed


def test_complete_pipelined_requests_then_eof_are_all_answered_before_the_close(server: Server) -> None:
    # printf 'POST ...' | nc -q0: the whole conversation, then FIN
    client = server.connect()
    client.send(post(url=b"/1") + get(b"/2") + chunked_post([b"ab"], url=b"/3"))
    client.protocol.eof_received()
    assert [r.body for r in client.responses] == [b"/1", b"/2", b"/3"]
    assert client.closed and server.state.abandoned == 0


def test_an_idle_keep_alive_connection_that_sends_eof_just_closes(server: Server) -> None:
    client = server.connect()
    client.send(get(b"/1"), b"\r\n")  # a stray CRLF after a request begins nothing
    client.protocol.eof_received()
    assert client.statuses == [200] and client.closed and server.state.abandoned == 0


PARTIAL_REQUESTS = {
    "request line": b"POST /v1/events HT",
    "some headers": b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Le",
    "body shorter than its Content-Length": b"POST /v1/events HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
    "chunked body without its last chunk": chunked_post([b"abc"])[:-len(b"0\r\n\r\n")],
    "expect 100-continue, then no body": (b"POST /v1/events HTTP/1.1\r\nExpect: 100-continue\r\n"
                                          b"Content-Length: 10\r\n\r\n"),
}


@pytest.mark.parametrize("partial", PARTIAL_REQUESTS.values(), ids=PARTIAL_REQUESTS.keys())
def test_eof_in_the_middle_of_a_request_closes_at_once_and_counts_it(server: Server, partial: bytes) -> None:
    """The request can never complete: no wait for header_timeout or body_timeout (nginx:
    "client prematurely closed connection"), and nothing of it reaches the app."""
    client = server.connect()
    client.send(partial)
    written = client.transport.data  # at most a 100 Continue
    client.protocol.eof_received()
    assert client.closed and client.transport.data == written
    assert server.app.requests == [] and server.state.abandoned == 1
    client.protocol.check_timeout(monotonic() + 100)  # no 408 comes later either
    assert client.transport.data == written


def test_eof_after_complete_requests_and_a_partial_one_answers_the_complete_ones(holding: Server) -> None:
    client = holding.connect()
    client.send(get(b"/1") + get(b"/2") + b"POST /3 HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
    client.protocol.eof_received()
    assert not client.closed  # two answers are owed
    holding.app.answer(1)
    holding.app.answer(0)
    assert [r.body for r in client.responses] == [b"/1", b"/2"]
    assert client.closed and holding.state.abandoned == 1
    assert [r.url for r in holding.app.requests] == [b"/1", b"/2"]


def test_a_reply_after_the_client_went_away_writes_nothing(holding: Server) -> None:
    client = holding.connect()
    client.send(get(b"/1"))
    client.transport.close()
    client.protocol.connection_lost(None)
    holding.app.answer(0)
    assert client.transport.data == b""
    assert holding.state.connections == set()


# --- bad requests and limits


def test_a_malformed_request_gets_400_then_close_after_the_earlier_pipelined_answers(holding: Server) -> None:
    client = holding.connect()
    client.send(get(b"/1") + b"NOT HTTP AT ALL\r\n\r\n")
    assert client.transport.data == b"" and not client.closed  # /1 is still owed
    assert not client.transport.reading
    holding.app.answer(0)
    responses = client.responses
    assert [(r.status, r.headers.get("connection")) for r in responses] == [(200, None), (400, "close")]
    assert b"malformed request" in responses[1].body
    assert client.closed
    client.send(get(b"/ignored"))
    assert [r.url for r in holding.app.requests] == [b"/1"]


def test_headers_over_max_header_size_get_431(server: Server) -> None:
    client = server.connect()
    client.send(get(extra=b"X-Big: %s\r\n" % (b"a" * 1100)))
    assert client.statuses == [431]
    assert client.responses[0].headers["connection"] == "close"
    assert client.closed and server.app.requests == []


def test_a_url_over_max_header_size_gets_431(server: Server) -> None:
    client = server.connect()
    client.send(get(b"/" + b"a" * 1100))
    assert client.statuses == [431] and client.closed


def test_a_header_line_that_never_ends_gets_431_once_over_the_limit(server: Server) -> None:
    # The limit must bound what is buffered, not only what has been parsed: a header
    # value that keeps growing without its CRLF must not be held until the timeout.
    client = server.connect()
    client.send(b"POST /v1/events HTTP/1.1\r\nX-Big: ")
    client.send(*[b"a" * 512] * 8)  # 4 KiB, four times max_header_size
    assert client.statuses == [431]
    assert client.closed


def test_too_many_header_fields_get_431(server: Server) -> None:
    client = server.connect()
    client.send(get(extra=b"".join(b"X-H%d: v\r\n" % i for i in range(10))))  # 11 with Host
    assert client.statuses == [431]
    assert b"too many header fields" in client.responses[0].body
    assert client.closed


def test_max_headers_header_fields_are_accepted(server: Server) -> None:
    client = server.connect()
    client.send(get(extra=b"".join(b"X-H%d: v\r\n" % i for i in range(9))))  # 10 with Host
    assert client.statuses == [200]


def test_content_length_over_max_body_gets_413_without_waiting_for_the_body(server: Server) -> None:
    client = server.connect()
    client.send(b"POST /v1/events HTTP/1.1\r\nContent-Length: 101\r\nHost: t\r\n\r\n")
    assert client.statuses == [413]
    assert client.responses[0].headers["connection"] == "close"
    assert client.closed and server.app.requests == []


def test_expect_100_continue_with_a_too_large_body_gets_413_and_no_interim_response(server: Server) -> None:
    client = server.connect()
    client.send(b"POST /v1/events HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 500\r\n\r\n")
    assert not client.transport.data.startswith(CONTINUE)
    assert client.statuses == [413]


def test_a_body_of_exactly_max_body_is_accepted(server: Server) -> None:
    client = server.connect()
    client.send(post(b"x" * 100))
    assert client.statuses == [200]
    assert server.app.requests[0].body == b"x" * 100


def test_a_chunked_body_over_max_body_gets_413(server: Server) -> None:
    client = server.connect()
    client.send(chunked_post([b"a" * 60, b"b" * 60]))
    assert client.statuses == [413]
    assert client.closed and server.app.requests == []


def test_max_connections_gets_503_and_close(server: Server) -> None:
    server.state.limits.max_connections = 2
    first, _ = server.connect(), server.connect()
    third = server.connect()
    response, = third.responses
    assert (response.status, response.headers["connection"], response.headers["retry-after"]) == (503, "close", "1")
    assert third.closed
    first.protocol.connection_lost(None)
    fourth = server.connect()
    fourth.send(get())
    assert fourth.statuses == [200]


def test_expect_100_continue_gets_the_interim_response_before_the_body(server: Server) -> None:
    client = server.connect()
    body = b'{"type":"a"}'
    client.send(b"POST /v1/events HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert client.transport.data == CONTINUE
    client.send(body)
    assert client.transport.data.startswith(CONTINUE)
    assert [r.status for r in parse_responses(client.transport.data[len(CONTINUE):])] == [200]
    assert server.app.requests[0].body == body


# --- timeouts: the worker's tick calls check_timeout(now)


def test_headers_not_received_within_header_timeout_get_408(server: Server) -> None:
    client = server.connect()
    client.send(b"POST /v1/events HTTP/1.1\r\nHost: t\r\n")
    now = monotonic()
    client.protocol.check_timeout(now + 5)
    assert client.transport.data == b"" and not client.closed
    client.protocol.check_timeout(now + 11)
    assert client.statuses == [408]
    assert client.responses[0].headers["connection"] == "close"
    assert client.closed


def test_a_body_not_received_within_body_timeout_gets_408(server: Server) -> None:
    client = server.connect()
    client.send(b"POST /v1/events HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    now = monotonic()
    client.protocol.check_timeout(now + 20)  # past header_timeout, within body_timeout
    assert client.transport.data == b"" and not client.closed
    client.protocol.check_timeout(now + 31)
    assert client.statuses == [408] and client.closed
    assert server.app.requests == []


def test_an_idle_keep_alive_connection_is_closed_silently(server: Server) -> None:
    client = server.connect()
    client.send(get())
    written = client.transport.data
    now = monotonic()
    client.protocol.check_timeout(now + 70)
    assert not client.closed
    client.protocol.check_timeout(now + 76)
    assert client.closed and client.transport.data == written


def test_a_connection_that_never_sends_is_closed_silently(server: Server) -> None:
    client = server.connect()
    client.protocol.check_timeout(monotonic() + 76)
    assert client.closed and client.transport.data == b""


def test_a_request_waiting_for_the_app_does_not_time_out(holding: Server) -> None:
    client = holding.connect()
    client.send(get())
    client.protocol.check_timeout(monotonic() + 1000)
    assert not client.closed
    holding.app.answer(0)
    assert client.statuses == [200]


# --- graceful shutdown


def test_shutdown_closes_an_idle_connection_at_once(server: Server) -> None:
    client = server.connect()
    client.send(get())
    client.protocol.shutdown()
    assert client.closed and client.statuses == [200]


def test_shutdown_of_a_busy_connection_closes_after_the_answer(holding: Server) -> None:
    client = holding.connect()
    client.send(get(b"/1"))
    client.protocol.shutdown()
    assert not client.closed and not client.transport.reading
    holding.app.answer(0)
    assert client.statuses == [200]
    assert client.closed


def test_the_answer_finished_during_shutdown_announces_connection_close(holding: Server) -> None:
    # The client must learn that the connection is going away instead of finding it closed
    # under its next request.
    client = holding.connect()
    client.send(get(b"/1"))
    client.protocol.shutdown()
    holding.app.answer(0)
    assert [(r.status, r.headers.get("connection")) for r in client.responses] == [(200, "close")]


def test_shutdown_during_a_request_answers_it_with_close(server: Server) -> None:
    client = server.connect()
    client.send(b"POST /v1/events HTTP/1.1\r\nContent-Length: 4\r\n\r\nab")
    client.protocol.shutdown()
    assert not client.closed
    client.send(b"cd")
    assert [(r.status, r.headers.get("connection")) for r in client.responses] == [(200, "close")]
    assert client.closed


def test_a_connection_accepted_as_the_worker_stops_gets_one_answer_then_close(server: Server) -> None:
    # uvloop accepts a burst and hands the connections over a turn later, when the graceful
    # stop may have begun: the client did nothing wrong, so its request is served.
    server.state.stopping = True
    client = server.connect()
    assert not client.closed
    client.send(get(b"/1") + get(b"/2"))
    assert [(r.status, r.headers.get("connection")) for r in client.responses] == [(200, "close")]
    assert client.closed


def test_over_max_connections_a_new_connection_gets_503(server: Server) -> None:
    server.state.limits.max_connections = 1
    first = server.connect()
    second = server.connect()
    assert not first.closed
    assert second.statuses == [503] and second.closed


def test_after_an_error_the_connection_half_closes_and_drops_the_rest_of_the_upload() -> None:
    """Closing with unread upload bytes makes the kernel send a reset, which can destroy
    the 413 before the client reads it: send FIN, drop what still comes, then close."""
    app = FakeApp()
    protocol = HttpProtocol(ServerState(app, make_limits()))
    transport = HalfCloseTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + b"x" * 1000)
    assert transport.data.startswith(b"HTTP/1.1 413 ")
    assert transport.calls[-1] == "write_eof" and not transport.closed
    protocol.data_received(b"x" * 4000)  # the rest of the upload is read and dropped
    assert not transport.closed and app.requests == []
    protocol.eof_received()
    assert transport.closed


def test_a_lingering_or_closing_connection_is_aborted_past_its_grace() -> None:
    protocol = HttpProtocol(ServerState(FakeApp(), make_limits()))
    transport = HalfCloseTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"BAD\x00 / HTTP/1.1\r\n\r\n")
    assert transport.calls[-1] == "write_eof"
    protocol.check_timeout(monotonic() + 60)
    assert transport.calls[-1] == "abort"

    closing = HttpProtocol(ServerState(FakeApp(), make_limits()))
    stuck = FakeTransport()
    closing.connection_made(stuck)
    closing.shutdown()  # close() asked; connection_lost never comes (kernel buffer full)
    assert stuck.calls[-1] == "close"
    closing.check_timeout(monotonic() + 60)
    assert stuck.calls[-1] == "abort"


def test_a_pipelined_request_in_the_same_chunk_as_a_body_is_not_counted_as_headers() -> None:
    app = FakeApp()
    protocol = HttpProtocol(ServerState(app, make_limits(max_body=50000, max_header_size=1024)))
    protocol.connection_made(FakeTransport())
    first = b"POST /a HTTP/1.1\r\nHost: t\r\nContent-"
    rest = (b"Length: 20000\r\n\r\n" + b"b" * 20000 + b"GET /b HTTP/1.1\r\nHost: t\r\n")
    protocol.data_received(first)
    protocol.data_received(rest)
    protocol.data_received(b"\r\n")
    assert [r.url for r in app.requests] == [b"/a", b"/b"]
