"""The HTTP/1.1 server protocol of a worker: one asyncio Protocol per connection, on
httptools.

Owns: parsing (the protocol is its own parser-callback object), keep-alive, in-order
pipelining, flow control, the request limits (431, 413) and the per-connection timeouts
(header, body: 408; idle keep-alive: silent close). Must not touch: what a request means
(the app) or Redis (the writer).

Pipelining: each complete request becomes an `Exchange` appended to `pending`; the app
may answer exchanges in any order (group commit finishes them in batches), but bytes
leave strictly in request order. Reading pauses while `max_pipeline` requests wait, while
the transport's write buffer is full, while a chunked body waits for room in the budget,
and once the connection is set to close.

Bodies still arriving count against the worker's budget (meteorit.worker.budget): at the
end of a read that leaves a body incomplete, it is admitted once or refused with 503; a
chunked one pauses its connection while the budget is over. A request that comes whole in
one read never meets it: the hot path pays one test per read and one per request.

Half-close: a client's FIN ends its requests, not its answers. Those that came whole are
answered, then the connection closes; one left incomplete can never complete, so it is
dropped at once (and counted) instead of held until its timeout.

Timeouts are deadlines, not timers: a connection stores one `deadline` and the worker's
once-a-second tick calls `check_timeout`, which costs nothing per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic
from typing import Any

import httptools

from .exchange import Exchange, ServerState
from .response import CONNECTION_CLOSE, CONNECTION_KEEP_ALIVE, CONTINUE, build, error_body

log = logging.getLogger("meteorit.http")

FORWARDED_FOR = b"x-forwarded-for"  # a list that may span several lines: they are joined

CLOSE_GRACE = 5.0  # seconds a closing connection may take to flush before it is aborted
LINGER_BYTES = 4 * 1024 * 1024  # request bytes read and dropped after an error, before closing
RETRY_AFTER = b"Retry-After: 1\r\n"


class _LimitExceeded(Exception):
    """Raised inside a parser callback to stop parsing; the status is in `protocol.error`."""


class HttpProtocol(asyncio.Protocol):
    def __init__(self, state: ServerState) -> None:
        # shared state
        self.state = state
        self.limits = state.limits
        # per connection
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[Exchange] = deque()
        self.closed = False  # close() was called
        self.lost = False  # connection_lost ran: the transport is gone
        self.lingering = 0  # bytes still to drop after an error response, before closing
        self.closing = False  # answer what is in hand, then close
        self.last_request = False  # answer one more request, then close
        self.failed = False  # the byte stream is unusable: ignore the rest of it
        self.in_message = False
        self.in_headers = False
        self.began = False  # a message began in the chunk being parsed
        self.header_bytes = 0  # bytes received while the headers are incomplete
        self.reading_paused = False
        self.writing_paused = False
        self.budget_paused = False  # a chunked body waits for room in the budget
        self.deadline = 0.0
        # per request
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.body_size = 0
        self.header_size = 0
        self.header_count = 0
        self.error: tuple[int, str] | None = None
        # False again once the request ends (_release_body): no reset per request
        self.admitted = False  # the body was still arriving at the end of a read: it is held
        self.held = 0  # bytes of the budget this request holds
        self.grows = False  # chunked: it holds what it has read so far

    # --- protocol interface

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        connections = self.state.connections
        if self.state.stopping and len(connections) < self.limits.max_connections:
            # Accepted in the same turn as the stop (uvloop accepts a burst, then calls us):
            # the client sent its request to a worker that was still listening, so answer
            # it, with Connection: close, instead of refusing work it had every right to send.
            self.last_request = True
        elif len(connections) >= self.limits.max_connections:
            self.state.errors[503] += 1
            transport.write(build(503, error_body("too many connections"), CONNECTION_CLOSE, RETRY_AFTER))
            self.closed = True
            transport.close()
            return
        connections.add(self)
        # a worker that is stopping waits for this one: no keep-alive grace for silence
        idle = self.limits.header_timeout if self.last_request else self.limits.keepalive_timeout
        self.deadline = monotonic() + idle

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.lost = True
        self.pending.clear()
        self._release_body()
        state = self.state
        state.connections.discard(self)
        if state.on_idle is not None and not state.connections:
            state.on_idle.set()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.lingering = max(0, self.lingering - len(data))
            if not self.lingering:
                self.close()
            return
        if self.failed or self.closed:
            return
        was_in_headers = self.in_headers
        self.began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request before the upgrade is answered; we speak no other protocol.
            self.closing = True
            self._update_reading()
        except httptools.HttpParserError as exc:
            self._parser_error(exc)
        else:
            # httptools calls on_header only once a line ends: a header line that never
            # ends would grow unseen, so count raw bytes until the headers are complete.
            # A chunk in which a message began is left to on_url/on_header: it may carry
            # the previous request's body.
            if was_in_headers and self.in_headers and not self.began:
                self.header_bytes += len(data)
                if self.header_bytes > self.limits.max_header_size:
                    self._fail(431, "request line and headers too large")
            elif self.in_message and not self.in_headers:
                self._hold_body()  # its body is still arriving (a whole request never gets here)

    def eof_received(self) -> bool | None:
        # The client is done sending: answer the requests that came whole, then close.
        # Returning True keeps our side open for writing them (the loop stops reading).
        if self.lingering:
            self.close()
            return True
        if self.in_message:
            self._abandon()
        self._close_after_owed()
        return True

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()

    # --- parser callbacks

    def on_message_begin(self) -> None:
        if self.closing:
            raise _LimitExceeded  # pipelined after a close was decided: ignore the rest
        self.in_message = self.in_headers = self.began = True
        self.header_bytes = 0
        self.url = b""
        self.headers = {}
        self.body = []
        self.body_size = self.header_size = self.header_count = 0
        self.error = None
        self.deadline = monotonic() + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_size += len(url)
        if self.header_size > self.limits.max_header_size:
            self._limit(431, "request line and headers too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        self.header_count += 1
        self.header_size += len(name) + len(value) + 4
        if self.header_size > limits.max_header_size:
            self._limit(431, "request line and headers too large")
        if self.header_count > limits.max_headers:
            self._limit(431, "too many header fields")
        name = name.lower()
        if name in self.state.kept_headers:
            if name not in self.headers:
                self.headers[name] = value
                if name == b"content-length" and value.isdigit() and int(value) > limits.max_body:
                    self._limit(413, f"body over the limit of {limits.max_body} bytes")
            elif name == FORWARDED_FOR:
                # one list over several lines: the hop our proxy added may be on the last one
                self.headers[name] += b", " + value

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.deadline = monotonic() + self.limits.body_timeout

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.limits.max_body:
            self._limit(413, f"body over the limit of {self.limits.max_body} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.deadline = 0.0
        if self.admitted:
            self._release_body()
        parts = self.body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parser = self.parser
        keep_alive = parser.should_keep_alive() and not self.closing and not self.last_request
        if keep_alive:
            connection = b"" if parser.get_http_version() == "1.1" else CONNECTION_KEEP_ALIVE
        else:
            connection = CONNECTION_CLOSE
            self.closing = True
        exchange = Exchange(self, connection, not keep_alive)
        self.pending.append(exchange)
        try:
            self.state.app.dispatch(exchange, parser.get_method(), self.url, self.headers, body)
        except Exception:
            log.exception("request handling failed")
            exchange.reply(500, error_body("internal error"))
        # Only the queue's length or a close can newly pause reading here, and a reading
        # paused may now resume: otherwise leave the transport alone (one call less per request).
        pending = self.pending
        if pending and (self.reading_paused or self.closing or len(pending) >= self.limits.max_pipeline):
            self._update_reading()

    # --- responses, flow control, closing

    def flush(self) -> None:
        """Write every finished response at the head of the queue, in request order."""
        pending = self.pending
        while pending and pending[0].data is not None:
            exchange = pending.popleft()
            self.transport.write(exchange.data)
            if exchange.close_after:
                if self.failed and not self.closed:
                    self._linger()
                else:
                    self.close()
                return
        if not pending and not self.in_message:
            if self.closing:
                self.close()
                return
            self.deadline = monotonic() + self.limits.keepalive_timeout
        if self.reading_paused:  # a shorter queue never pauses reading: only a resume to check
            self._update_reading()

    def shutdown(self) -> None:
        """Graceful stop: finish the request in hand and those waiting, then close."""
        self._close_after_owed()

    def _close_after_owed(self) -> None:
        """Answer the request being read and those waiting (the last one announces the
        close), then close; at once if nothing is owed."""
        self.closing = True
        if not self.pending and not self.in_message:
            self.close()
            return
        last = self.pending[-1] if self.pending and not self.in_message else None
        if last is not None and last.data is None:
            last.connection, last.close_after = CONNECTION_CLOSE, True  # tell the client
        self._update_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.lingering = 0
            if self.writing_paused:
                self.transport.abort()  # a client that does not read gets no more grace
            else:
                self.transport.close()
                self.deadline = monotonic() + CLOSE_GRACE  # then check_timeout aborts

    def _linger(self) -> None:
        """After an error response: send FIN, then read and drop what the client is still
        sending for a while, so its unread upload does not turn our close into a reset
        that destroys the response before the client reads it."""
        transport = self.transport
        if not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        self.lingering = LINGER_BYTES
        self.deadline = monotonic() + CLOSE_GRACE
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def check_timeout(self, now: float) -> None:
        if not self.deadline or now <= self.deadline or self.lost:
            return
        if self.closed or self.lingering:
            self.closed = True
            self.lingering = 0
            self.transport.abort()  # its close did not complete in time
        elif self.in_message:
            self._fail(408, "request not received in time")
        else:
            self.close()

    # --- the budget of bodies still arriving (meteorit.worker.budget)

    def _hold_body(self) -> None:
        """At the end of a read, a body still arriving: admitted once (its Content-Length
        reserved) or refused with 503; a chunked one holds what it has read, and its
        connection stops reading while the budget is over."""
        budget = self.state.budget
        if not self.admitted:
            length = self.headers.get(b"content-length")
            if length is not None and length.isdigit():
                self.grows, size = False, int(length)
            else:  # chunked: no length to reserve
                self.grows, size = True, self.body_size
            if not budget.admit(size):
                self._fail(503, "too many request bodies in progress", RETRY_AFTER)
                return
            self.admitted, self.held = True, size
            expect = self.headers.get(b"expect")
            if expect is not None and expect.lower() == b"100-continue" and not self.pending:
                self.transport.write(CONTINUE)  # only now: a refused body is never invited
        elif self.grows:
            budget.grow(self.body_size - self.held)
            self.held = self.body_size
        if self.grows and budget.over and not self.budget_paused:
            self.budget_paused = True
            budget.wait(self)
            self._update_reading()

    def room_made(self) -> None:
        """The budget is under its limit again (BodyBudget.release)."""
        self.budget_paused = False
        self._update_reading()

    def _release_body(self) -> None:
        """The body went to the app or was dropped: its bytes go back to the budget."""
        budget = self.state.budget
        if self.budget_paused:
            self.budget_paused = False
            budget.forget(self)
        self.admitted = False
        if self.held:
            held, self.held = self.held, 0
            budget.release(held)

    def _update_reading(self) -> None:
        if self.closed or self.lingering:
            return
        pause = (self.failed or self.writing_paused or self.budget_paused
                 or len(self.pending) >= self.limits.max_pipeline
                 or (self.closing and not self.in_message))
        if pause != self.reading_paused:
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _abandon(self) -> None:
        """The client half-closed in the middle of a request, which so can never complete
        (nginx: "client prematurely closed connection"): drop it, count it, wait for no
        timeout. Only the requests that came whole are answered."""
        self.in_message = self.in_headers = False
        self.deadline = 0.0
        self.body = []
        self._release_body()
        self.state.abandoned += 1
        log.debug("client closed its side in the middle of a request")

    def _limit(self, status: int, message: str) -> None:
        self.error = (status, message)
        raise _LimitExceeded

    def _parser_error(self, exc: Exception) -> None:
        if self.error is not None:
            self._fail(*self.error)
        elif isinstance(exc, httptools.HttpParserCallbackError):
            if self.closing:  # a pipelined request after a close was decided
                self.failed = True
                self._update_reading()
                return
            log.error("request handling failed", exc_info=exc.__context__)
            self._fail(500, "internal error")
        else:
            self._fail(400, f"malformed request: {exc}")

    def _fail(self, status: int, message: str, extra: bytes = b"") -> None:
        """Answer `status` after the responses already owed, then close."""
        self.failed = self.closing = True
        self.in_message = False
        self.deadline = 0.0
        self._release_body()
        exchange = Exchange(self, CONNECTION_CLOSE, True)
        self.pending.append(exchange)
        self.state.errors[status] += 1
        exchange.reply(status, error_body(message), extra)
        self._update_reading()  # stop reading, if responses owed before this one keep it open
