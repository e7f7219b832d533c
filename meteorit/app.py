"""Routes and their meaning: what each request of the HTTP API does.

Owns: routing, API-key auth, turning EventError and writer states into statuses, and the
worker's request counters. Must not touch: sockets (http) or Redis (writer): events go
to Redis only through `RedisWriter.submit`.

    POST /v1/events   202 {"accepted": N} once Redis acknowledged every event
    GET  /healthz     200 while the worker runs
    GET  /readyz      200 when Redis can take events, else 503
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import Counter
from types import SimpleNamespace

from . import events
from .errors import EventError, WriterUnavailable
from .http import Exchange
from .response import TEXT_TYPE, error_body
from .writer import RedisWriter

log = logging.getLogger("meteorit.app")

RETRY_AFTER = b"Retry-After: 1\r\n"
ALLOW_POST = b"Allow: POST\r\n"
ALLOW_GET = b"Allow: GET\r\n"
WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="meteorit"\r\n'


class Auth:
    """API keys from the config, compared in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = [k.encode() for k in keys]

    def allows(self, headers: dict[bytes, bytes]) -> bool:
        presented = headers.get(b"x-api-key")
        if presented is None:
            authorization = headers.get(b"authorization", b"")
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() != b"bearer":
                return False
            presented = token.strip()
        # Compare with every key, without stopping at a match: the time taken tells nothing.
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(presented, key)
        return found


class EventsApp:
    def __init__(self, config: SimpleNamespace, writer: RedisWriter) -> None:
        self.writer = writer
        self.auth = Auth(config.auth.keys)
        self.max_events = config.limits.max_events_per_request
        self.max_event_size = config.limits.max_event_size
        self.ids = events.IdGenerator()
        self.statuses: Counter[int] = Counter()
        self.events_accepted = 0

    def dispatch(self, exchange: Exchange, method: bytes, url: bytes,
                 headers: dict[bytes, bytes], body: bytes) -> None:
        path = url.split(b"?", 1)[0]
        if path == b"/v1/events":
            if method != b"POST":
                return self._reply(exchange, 405, error_body("use POST"), ALLOW_POST)
            return self.post_events(exchange, headers, body)
        if path == b"/healthz" or path == b"/readyz":
            if method != b"GET":
                return self._reply(exchange, 405, error_body("use GET"), ALLOW_GET)
            if path == b"/readyz" and not self.writer.ready:
                return self._reply(exchange, 503, b"redis unreachable\n", RETRY_AFTER, TEXT_TYPE)
            return self._reply(exchange, 200, b"ok\n", b"", TEXT_TYPE)
        return self._reply(exchange, 404, error_body("not found"))

    def post_events(self, exchange: Exchange, headers: dict[bytes, bytes], body: bytes) -> None:
        if self.auth.keys and not self.auth.allows(headers):
            return self._reply(exchange, 401, error_body("missing or invalid API key"), WWW_AUTHENTICATE)
        fmt = events.body_format(headers.get(b"content-type"))
        if fmt is None:
            return self._reply(exchange, 415, error_body(
                "use application/json, application/x-ndjson or application/msgpack"))
        encoding = headers.get(b"content-encoding")
        if encoding is not None and encoding.strip().lower() != b"identity":
            return self._reply(exchange, 415, error_body("content encodings are not supported"))
        try:
            batch = events.decode(body, fmt, self.max_events)
            records, size = events.records(batch, int(time.time() * 1000), self.ids, self.max_event_size)
        except EventError as exc:
            return self._reply(exchange, exc.status, error_body(exc.reason, exc.index))

        def done(error: Exception | None) -> None:
            if error is None:
                self.events_accepted += len(records)
                self._reply(exchange, 202, b'{"accepted":%d}' % len(records))
            else:
                self._reply(exchange, 503, error_body("queue unavailable"), RETRY_AFTER)

        try:
            self.writer.submit(records, size, done)
        except WriterUnavailable as exc:
            self._reply(exchange, 503, error_body(str(exc)), RETRY_AFTER)

    def _reply(self, exchange: Exchange, status: int, body: bytes, extra: bytes = b"",
               content_type: bytes = b"application/json") -> None:
        self.statuses[status] += 1
        exchange.reply(status, body, extra, content_type)
