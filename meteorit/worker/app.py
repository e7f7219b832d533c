"""Routes and their meaning: what each request of the HTTP API does.

Owns: routing, the steps every event request goes through (key, Origin rules, body or query
into events, request context, records, per-key rate limit, the writer), turning EventError
and writer states into statuses, and the worker's request counters. The browser routes
(preflights, the pixel, the snippet) are meteorit.worker.browser's, the Segment tracking API's
(`/v1/batch`, `/v1/track`, ...) meteorit.worker.segment's: both go through the same steps and
answer in their own way (an `Answer`). Must not touch: sockets
(http), Redis (writer: events go to Redis only through `RedisWriter.submit`) or the bus (the
worker gives the app a `collect_stats` coroutine that gathers every worker's counters).

    POST    /v1/events      202 {"accepted": N} once Redis acknowledged every event, or
                            202 {"accepted": N, "spooled": true} once the spool has them
    GET     /v1/pixel.gif   a 1x1 GIF, and one event from the query string (browser.py)
    GET     /v1/meteorit.js the browser snippet (browser.py)
    POST    /v1/batch       200 {"success": true}, the Segment tracking API (segment.py), and
            /v1/track, /v1/identify, /v1/page, /v1/screen, /v1/group, /v1/alias
    OPTIONS any of those    CORS preflight (browser.py)
    GET     /healthz        200 while the worker runs
    GET     /readyz         200 when Redis or the spool can take events, else 503
    GET     /metrics        every worker's counters and their sums, Prometheus text
    GET     /v1/stats       the same as JSON

The plain `POST /v1/events` pays for the browser face with three attribute tests (CORS,
keys, context configured?) and two more calls (`records` and `submit`, shared with the
pixel and Segment): no Origin lookup, no query parsing, no context object unless
configured. Its path is tested first: the other routes cost it nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Awaitable, Callable, Protocol

import orjson

from . import browser, compression, events, query, segment
from .. import metrics, record
from ..config import Config
from ..errors import EventError, WriterUnavailable
from .context import RequestContext, attach
from .cors import CorsPolicy
from .exchange import KEPT_HEADERS, Exchange
from .keys import NO_KEY, QUERY_KEY, SECRET_IN_URL, KeyRing
from .ratelimit import KeyRates, retry_after
from .response import RETRY_AFTER, TEXT_TYPE, error_body
from .writer import RedisWriter

log = logging.getLogger("meteorit.app")

ALLOW_GET = b"Allow: GET\r\n"
WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="meteorit"\r\n'
REFUSAL_HEADERS = {401: WWW_AUTHENTICATE, 503: RETRY_AFTER}
ACCEPTED_BODY = b'{"accepted":%d}'
SPOOLED_BODY = b'{"accepted":%d,"spooled":true}'  # on disk, replayed into Redis once it is back
PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
STATS_CACHE = 0.5  # seconds a gathered stats document answers further scrapes
EVENTS_PATH = b"/v1/events"
STATS_PATHS = (b"/healthz", b"/readyz", b"/metrics", b"/v1/stats")

CollectStats = Callable[[], Awaitable[metrics.Snapshot]]


class Answer(Protocol):
    """How a route other than `POST /v1/events` answers the event request it submitted or
    refused (the pixel: a GIF whatever happens; Segment: `{"success": true}`)."""

    def accepted(self, app: EventsApp, exchange: Exchange, start: float, count: int, spooled: bool,
                 extra: bytes) -> None: ...

    def refused(self, app: EventsApp, exchange: Exchange, start: float, exc: EventError,
                extra: bytes) -> None: ...


class EventsApp:
    def __init__(self, config: Config, writer: RedisWriter,
                 collect_stats: CollectStats | None = None) -> None:
        self.writer = writer
        self.collect_stats = collect_stats
        self.ids = record.IdGenerator()
        self.counters = metrics.WorkerCounters()
        self._stats: tuple[float, asyncio.Future[metrics.Snapshot]] | None = None
        self._rates_key: tuple[int, int, tuple[str, ...]] | None = None
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take the hot settings of a (re)loaded config; runs between requests."""
        self.keys = KeyRing(config.auth.keys, config.auth.public_keys)
        self.restrict_public_keys = config.auth.restrict_public_keys
        self.cors = CorsPolicy(config.http.cors_origins)
        # one attribute each for the hot path to test (not self.keys.enabled: two lookups)
        self.auth_on = self.keys.enabled
        self.cors_on = self.cors.enabled
        self.context = (RequestContext(config.events.context, config.server.trusted_proxies)
                        if config.events.context else None)
        # what the HTTP layer keeps of each request's headers (the worker hands it over)
        self.kept_headers = KEPT_HEADERS | (self.context.headers_needed if self.context else frozenset())
        self.max_body = config.limits.max_body
        self.max_events = config.limits.max_events_per_request
        self.max_event_size = config.limits.max_event_size
        self.segment = segment.Limits(config.segment.max_message_size, config.segment.max_batch_size,
                                      config.limits.max_events_per_request)
        all_keys = tuple(config.auth.keys) + tuple(config.auth.public_keys)
        rates = (config.limits.key_rate, config.limits.key_burst, all_keys)
        if self._rates_key != rates:  # new rates or keys: new buckets (a key's index may change)
            self._rates_key = rates
            self.rates = KeyRates(config.limits.key_rate, config.limits.key_burst, len(all_keys),
                                  time.monotonic())
            self.rates_tag = hashlib.sha256(repr(rates).encode()).hexdigest()[:12]  # no key on the bus

    @property
    def events_accepted(self) -> int:
        return self.counters.events_accepted

    @property
    def statuses(self) -> dict[int, int]:
        return self.counters.requests

    def dispatch(self, exchange: Exchange, method: bytes, url: bytes,
                 headers: dict[bytes, bytes], body: bytes) -> None:
        start = time.monotonic()
        path = url.split(b"?", 1)[0]
        if path == EVENTS_PATH:
            if method == b"POST":
                return self.post_events(exchange, start, url, headers, body)
            return browser.other_method(self, exchange, start, method, headers, browser.POST_METHODS)
        if path in segment.ROUTES:
            if method == b"POST":
                return segment.post(self, exchange, start, url, headers, body, segment.ROUTES[path])
            return browser.other_method(self, exchange, start, method, headers, browser.POST_METHODS)
        if path in browser.GET_ROUTES:
            if method == b"GET":
                return browser.GET_ROUTES[path](self, exchange, start, url, headers)
            return browser.other_method(self, exchange, start, method, headers, browser.GET_METHODS)
        if method != b"GET" and path in STATS_PATHS:
            return self.reply(exchange, start, 405, error_body("use GET"), ALLOW_GET)
        if path == b"/healthz":
            return self.reply(exchange, start, 200, b"ok\n", b"", TEXT_TYPE)
        if path == b"/readyz":
            refusal = self.writer.refusal  # Redis or the spool can take events, else shedding
            note = self.writer.readiness_note()  # cluster mode: the shards, and which are unreachable
            if refusal is not None:
                return self.reply(exchange, start, 503, f"{refusal}{note}\n".encode(), RETRY_AFTER, TEXT_TYPE)
            return self.reply(exchange, start, 200, f"ok{note}\n".encode(), b"", TEXT_TYPE)
        if path == b"/metrics" or path == b"/v1/stats":
            return self.get_stats(exchange, start, prometheus=path == b"/metrics")
        return self.reply(exchange, start, 404, error_body("not found"))

    def post_events(self, exchange: Exchange, start: float, url: bytes, headers: dict[bytes, bytes],
                    body: bytes) -> None:
        self.counters.bytes_in += len(body)
        cors = self.cors_headers(headers) if self.cors_on else b""
        try:
            key = self.identify(url, headers) if self.auth_on else NO_KEY
            fmt = events.body_format(headers.get(b"content-type"))
            if fmt is None:
                raise EventError(415, "use application/json, application/x-ndjson or application/msgpack")
            encoding = headers.get(b"content-encoding")
            if encoding is not None:
                body = self.inflate(body, encoding)
            records, size = self.records(exchange, headers, events.decode(body, fmt, self.max_events))
        except EventError as exc:
            return self.refuse(exchange, start, exc, 1, cors)
        self.submit(exchange, start, key, records, size, cors)

    # --- the steps of an event request, shared with the browser routes

    def cors_headers(self, headers: dict[bytes, bytes]) -> bytes:
        """The CORS headers of a response to this request (call only with CORS configured):
        none without an Origin, none (and counted) for an origin not allowed."""
        origin = headers.get(b"origin")
        if origin is None:
            return b""
        if self.cors.allows(origin):
            return self.cors.response_headers(origin)
        self.counters.cors_refused += 1
        return b""

    def identify(self, url: bytes, headers: dict[bytes, bytes], query_key: str | None = None,
                 body_key: str | None = None) -> int:
        """The number of the request's key (call only with keys configured); EventError 401
        without a valid one, 403 for a public key used from an origin not allowed.
        `body_key`: one the body carries (Segment's `writeKey`)."""
        keys = self.keys
        if query_key is None and keys.public and b"?" in url:
            query_key = query.parse(query.split_target(url)[1]).get(QUERY_KEY)
        index = keys.identify(headers, query_key, body_key)
        if index == SECRET_IN_URL:
            raise EventError(401, "this key is secret (auth.keys): send it in a header, never in a URL; "
                             "pages use a public key (auth.public_keys)")
        if index < 0:
            raise EventError(401, "missing or invalid API key")
        if self.restrict_public_keys and keys.is_public(index):
            origin = headers.get(b"origin")
            if origin is not None and not self.cors.allows(origin):
                raise EventError(403, "this public key may not be used from this origin (http.cors_origins)")
        return index

    def records(self, exchange: Exchange, headers: dict[bytes, bytes],
                batch: list[dict]) -> tuple[list[bytes], int]:
        """The queue records of a request's valid events, with its context when configured."""
        if self.context is not None:
            attach(batch, self.context.build(exchange.peer_address(), headers))
        return record.encode(batch, int(time.time() * 1000), self.ids, self.max_event_size)

    def inflate(self, body: bytes, header: bytes) -> bytes:
        encoding = compression.encoding_of(header)
        if encoding is None:
            raise EventError(415, "use Content-Encoding gzip or deflate, or none")
        return compression.inflate(body, encoding, self.max_body)

    def submit(self, exchange: Exchange, start: float, key: int, records: list[bytes], size: int,
               extra: bytes, answer: Answer | None = None) -> None:
        """Past the key's rate limit, to the writer; answered once Redis or the spool has
        every record, or refused whole; by `answer`, else as `POST /v1/events` answers."""
        count = len(records)
        if key >= 0 and self.rates.enabled:
            wait = self.rates.admit(key, count, start)
            if wait:
                return self.refuse(exchange, start, EventError(429, "over this API key's rate limit"), count,
                                   b"Retry-After: %d\r\n%s" % (retry_after(wait), extra), answer)

        def done(error: Exception | None, spooled: bool) -> None:
            if error is not None:
                self.refuse(exchange, start, EventError(503, "queue unavailable"), count, extra, answer)
                return
            self.counters.events_accepted += count
            if answer is not None:
                answer.accepted(self, exchange, start, count, spooled, extra)
            else:
                self.reply(exchange, start, 202, (SPOOLED_BODY if spooled else ACCEPTED_BODY) % count, extra)

        try:
            self.writer.submit(records, size, done)
        except WriterUnavailable as exc:
            self.refuse(exchange, start, EventError(503, str(exc)), count, extra, answer)

    def refuse(self, exchange: Exchange, start: float, exc: EventError, events_count: int, extra: bytes,
               answer: Answer | None = None) -> None:
        """A refused event request: counted by reason, answered with the error (by `answer`)."""
        self.counters.rejected(exc.status, events_count)
        if answer is not None:
            return answer.refused(self, exchange, start, exc, extra)
        self.reply(exchange, start, exc.status, error_body(exc.reason, exc.index),
                    REFUSAL_HEADERS.get(exc.status, b"") + extra)

    def get_stats(self, exchange: Exchange, start: float, prometheus: bool) -> None:
        if self.collect_stats is None:
            return self.reply(exchange, start, 404, error_body("not found"))
        future = self._stats_document()

        def answer(done: asyncio.Future[metrics.Snapshot]) -> None:
            if done.cancelled() or done.exception() is not None:
                log.error("gathering stats failed: %r", None if done.cancelled() else done.exception())
                return self.reply(exchange, start, 503, error_body("stats unavailable"), RETRY_AFTER)
            doc = done.result()
            if prometheus:
                self.reply(exchange, start, 200, metrics.prometheus(doc).encode(), b"", PROMETHEUS_TYPE)
            else:
                self.reply(exchange, start, 200, orjson.dumps(doc))

        future.add_done_callback(answer)

    def _stats_document(self) -> asyncio.Future[metrics.Snapshot]:
        """One gather over the bus serves every scrape that comes while it runs, and for
        STATS_CACHE after: a flood of scrapes cannot turn into a flood of alerts."""
        now = time.monotonic()
        if self._stats is not None and (not self._stats[1].done() or now - self._stats[0] < STATS_CACHE):
            return self._stats[1]
        assert self.collect_stats is not None
        future = asyncio.ensure_future(self.collect_stats())
        self._stats = (now, future)
        return future

    def reply(self, exchange: Exchange, start: float, status: int, body: bytes, extra: bytes = b"",
               content_type: bytes = b"application/json") -> None:
        counters = self.counters
        counters.requests[status] += 1
        counters.duration.observe(time.monotonic() - start)
        exchange.reply(status, body, extra, content_type)

    def reply_bare(self, exchange: Exchange, start: float, status: int, extra: bytes) -> None:
        """A response without content: 204, 304."""
        counters = self.counters
        counters.requests[status] += 1
        counters.duration.observe(time.monotonic() - start)
        exchange.reply_bare(status, extra)
