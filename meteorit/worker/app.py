"""Routes and their meaning: what each request of the HTTP API does.

Owns: routing, API-key auth, per-key rate limits, turning EventError and writer states
into statuses, and the worker's request counters. Must not touch: sockets (http), Redis
(writer: events go to Redis only through `RedisWriter.submit`) or the bus (the worker
gives the app a `collect_stats` coroutine that gathers every worker's counters).

    POST /v1/events   202 {"accepted": N} once Redis acknowledged every event, or
                      202 {"accepted": N, "spooled": true} once the spool has them
    GET  /healthz     200 while the worker runs
    GET  /readyz      200 when Redis or the spool can take events, else 503
    GET  /metrics     every worker's counters and their sums, Prometheus text
    GET  /v1/stats    the same as JSON
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Awaitable, Callable

import orjson

from . import events
from .. import metrics, record
from ..config import Config
from ..errors import EventError, WriterUnavailable
from .http import Exchange
from .ratelimit import KeyRates, retry_after
from .response import TEXT_TYPE, error_body
from .writer import RedisWriter

log = logging.getLogger("meteorit.app")

RETRY_AFTER = b"Retry-After: 1\r\n"
ALLOW_POST = b"Allow: POST\r\n"
ALLOW_GET = b"Allow: GET\r\n"
WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="meteorit"\r\n'
ACCEPTED_BODY = b'{"accepted":%d}'
SPOOLED_BODY = b'{"accepted":%d,"spooled":true}'  # on disk, replayed into Redis once it is back
PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
STATS_CACHE = 0.5  # seconds a gathered stats document answers further scrapes

CollectStats = Callable[[], Awaitable[metrics.Snapshot]]


class Auth:
    """API keys from the config, compared in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = [k.encode() for k in keys]

    def identify(self, headers: dict[bytes, bytes]) -> int:
        """The index of the presented key in the config, or -1."""
        presented = headers.get(b"x-api-key")
        if presented is None:
            authorization = headers.get(b"authorization", b"")
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() != b"bearer":
                return -1
            presented = token.strip()
        # Compare with every key, without stopping at a match: the time taken tells nothing.
        found = -1
        for index, key in enumerate(self.keys):
            if hmac.compare_digest(presented, key):
                found = index
        return found


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
        self.auth = Auth(config.auth.keys)
        self.max_events = config.limits.max_events_per_request
        self.max_event_size = config.limits.max_event_size
        rates = (config.limits.key_rate, config.limits.key_burst, tuple(config.auth.keys))
        if self._rates_key != rates:  # new rates or keys: new buckets (a key's index may change)
            self._rates_key = rates
            self.rates = KeyRates(config.limits.key_rate, config.limits.key_burst, len(config.auth.keys),
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
        if path == b"/v1/events":
            if method != b"POST":
                return self._reply(exchange, start, 405, error_body("use POST"), ALLOW_POST)
            return self.post_events(exchange, start, headers, body)
        if method != b"GET" and path in (b"/healthz", b"/readyz", b"/metrics", b"/v1/stats"):
            return self._reply(exchange, start, 405, error_body("use GET"), ALLOW_GET)
        if path == b"/healthz":
            return self._reply(exchange, start, 200, b"ok\n", b"", TEXT_TYPE)
        if path == b"/readyz":
            refusal = self.writer.refusal  # Redis or the spool can take events, else shedding
            note = self.writer.readiness_note()  # cluster mode: the shards, and which are unreachable
            if refusal is not None:
                return self._reply(exchange, start, 503, f"{refusal}{note}\n".encode(), RETRY_AFTER, TEXT_TYPE)
            return self._reply(exchange, start, 200, f"ok{note}\n".encode(), b"", TEXT_TYPE)
        if path == b"/metrics" or path == b"/v1/stats":
            return self.get_stats(exchange, start, prometheus=path == b"/metrics")
        return self._reply(exchange, start, 404, error_body("not found"))

    def post_events(self, exchange: Exchange, start: float, headers: dict[bytes, bytes],
                    body: bytes) -> None:
        self.counters.bytes_in += len(body)
        key = self.auth.identify(headers) if self.auth.keys else -1
        if self.auth.keys and key < 0:
            return self._reject(exchange, start, 401, 1, error_body("missing or invalid API key"),
                                WWW_AUTHENTICATE)
        fmt = events.body_format(headers.get(b"content-type"))
        if fmt is None:
            return self._reject(exchange, start, 415, 1, error_body(
                "use application/json, application/x-ndjson or application/msgpack"))
        encoding = headers.get(b"content-encoding")
        if encoding is not None and encoding.strip().lower() != b"identity":
            return self._reject(exchange, start, 415, 1, error_body("content encodings are not supported"))
        try:
            batch = events.decode(body, fmt, self.max_events)
            records, size = record.encode(batch, int(time.time() * 1000), self.ids, self.max_event_size)
        except EventError as exc:
            return self._reject(exchange, start, exc.status, 1, error_body(exc.reason, exc.index))
        if key >= 0 and self.rates.enabled:
            wait = self.rates.admit(key, len(records), start)
            if wait:
                return self._reject(exchange, start, 429, len(records),
                                    error_body("over this API key's rate limit"),
                                    b"Retry-After: %d\r\n" % retry_after(wait))

        def done(error: Exception | None, spooled: bool) -> None:
            if error is None:
                self.counters.events_accepted += len(records)
                self._reply(exchange, start, 202, (SPOOLED_BODY if spooled else ACCEPTED_BODY) % len(records))
            else:
                self._reject(exchange, start, 503, len(records), error_body("queue unavailable"), RETRY_AFTER)

        try:
            self.writer.submit(records, size, done)
        except WriterUnavailable as exc:
            self._reject(exchange, start, 503, len(records), error_body(str(exc)), RETRY_AFTER)

    def get_stats(self, exchange: Exchange, start: float, prometheus: bool) -> None:
        if self.collect_stats is None:
            return self._reply(exchange, start, 404, error_body("not found"))
        future = self._stats_document()

        def answer(done: asyncio.Future[metrics.Snapshot]) -> None:
            if done.cancelled() or done.exception() is not None:
                log.error("gathering stats failed: %r", None if done.cancelled() else done.exception())
                return self._reply(exchange, start, 503, error_body("stats unavailable"), RETRY_AFTER)
            doc = done.result()
            if prometheus:
                self._reply(exchange, start, 200, metrics.prometheus(doc).encode(), b"", PROMETHEUS_TYPE)
            else:
                self._reply(exchange, start, 200, orjson.dumps(doc))

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

    def _reject(self, exchange: Exchange, start: float, status: int, events_count: int, body: bytes,
                extra: bytes = b"") -> None:
        self.counters.rejected(status, events_count)
        self._reply(exchange, start, status, body, extra)

    def _reply(self, exchange: Exchange, start: float, status: int, body: bytes, extra: bytes = b"",
               content_type: bytes = b"application/json") -> None:
        counters = self.counters
        counters.requests[status] += 1
        counters.duration.observe(time.monotonic() - start)
        exchange.reply(status, body, extra, content_type)
