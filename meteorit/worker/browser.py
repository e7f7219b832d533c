"""The browser routes: CORS preflights, the tracking pixel and the snippet.

Owns: `OPTIONS` on the browser endpoints, `GET /v1/pixel.gif` (one event from the query
string, answered with a 1x1 GIF whatever becomes of the event), `GET /v1/meteorit.js` (the
snippet, read once at import with its ETag) and their response headers. The steps an event
goes through (key, Origin rules, context, records, rate limit, writer) are the app's, the
same as `POST /v1/events`. Must not touch: sockets, Redis, the bus.

    GET /v1/pixel.gif?key=pk_...&type=open&campaign=spring

Every parameter but `key` becomes a string field of the event; `type` is required. The GIF
comes after Redis (or the spool) has the event, as a 202 would; a refused event gets the
GIF at once: an email client shows no broken image, and `X-Meteorit-Outcome` and the
`meteorit_pixel_requests_total` counter tell why.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import TYPE_CHECKING, Callable

from . import query
from .. import metrics, record
from ..errors import EventError
from .exchange import Exchange
from .keys import NO_KEY, QUERY_KEY
from .response import error_body

if TYPE_CHECKING:
    from .app import EventsApp

POST_METHODS = b"POST, OPTIONS"
GET_METHODS = b"GET, OPTIONS"
ACCEPTED = "accepted"  # a pixel outcome; the others are metrics.REJECT_REASONS' names

# The smallest transparent GIF: 1x1, a 2-colour palette, colour 0 transparent.
PIXEL_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
             b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
GIF_TYPE = b"image/gif"
PIXEL_HEADERS = b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"

SNIPPET_FILE = "meteorit.js"  # in meteorit/worker/static/, shipped as package data
JS_TYPE = b"text/javascript; charset=utf-8"
SNIPPET_MAX_AGE = 86400  # a day in caches, then revalidated against the ETag (a 304)


class Asset:
    """A static file served from memory: read once, its ETag computed once."""

    __slots__ = ("body", "etag", "headers")

    def __init__(self, body: bytes, max_age: int) -> None:
        self.body = body
        self.etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:20].encode()
        self.headers = (b"ETag: %s\r\nCache-Control: public, max-age=%d\r\nX-Content-Type-Options: nosniff\r\n"
                        % (self.etag, max_age))

    @classmethod
    def packaged(cls, name: str, max_age: int) -> Asset:
        return cls((resources.files(__package__) / "static" / name).read_bytes(), max_age)

    def matches(self, if_none_match: bytes) -> bool:
        """Whether an If-None-Match header names this version (weak tags compare too)."""
        for tag in if_none_match.split(b","):
            tag = tag.strip()
            if tag == b"*" or tag.removeprefix(b"W/") == self.etag:
                return True
        return False


SNIPPET = Asset.packaged(SNIPPET_FILE, SNIPPET_MAX_AGE)


def other_method(app: EventsApp, exchange: Exchange, start: float, method: bytes,
                 headers: dict[bytes, bytes], allowed: bytes) -> None:
    """A method the route does not serve: OPTIONS is a CORS preflight, the rest get 405."""
    if method == b"OPTIONS":
        return preflight(app, exchange, start, headers, allowed)
    app.reply(exchange, start, 405, error_body(f"use {allowed.split(b',')[0].decode()}"),
               b"Allow: %s\r\n" % allowed)


def preflight(app: EventsApp, exchange: Exchange, start: float, headers: dict[bytes, bytes],
              allowed: bytes) -> None:
    """204 with the CORS headers for an allowed origin; 403 without any for another; a
    plain OPTIONS (no Origin) learns the methods."""
    origin = headers.get(b"origin")
    if origin is None:
        return app.reply_bare(exchange, start, 204, b"Allow: %s\r\n" % allowed)
    if app.cors.allows(origin):
        return app.reply_bare(exchange, start, 204, app.cors.preflight_headers(origin, allowed))
    app.counters.cors_refused += 1
    app.reply(exchange, start, 403, error_body("this origin is not allowed (http.cors_origins)"))


def get_pixel(app: EventsApp, exchange: Exchange, start: float, url: bytes,
              headers: dict[bytes, bytes]) -> None:
    cors = app.cors_headers(headers) if app.cors.enabled else b""
    try:
        event = query.parse(query.split_target(url)[1])
        query_key = event.pop(QUERY_KEY, None)  # never a field of the event
        key = app.identify(url, headers, query_key) if app.keys.enabled else NO_KEY
        reason = record.invalid_reason(event)
        if reason:
            raise EventError(400, reason, 0)
        records, size = app.records(exchange, headers, [event])
    except EventError as exc:
        return app.refuse(exchange, start, exc, 1, cors, PIXEL_ANSWER)
    app.submit(exchange, start, key, records, size, cors, PIXEL_ANSWER)


class PixelAnswer:
    """The pixel answers with the GIF whatever becomes of its event; the header and the
    counter tell the outcome."""

    @staticmethod
    def accepted(app: EventsApp, exchange: Exchange, start: float, count: int, spooled: bool,
                 extra: bytes) -> None:
        pixel_reply(app, exchange, start, ACCEPTED, extra)

    @staticmethod
    def refused(app: EventsApp, exchange: Exchange, start: float, exc: EventError, extra: bytes) -> None:
        pixel_reply(app, exchange, start, metrics.reject_reason(exc.status), extra)


PIXEL_ANSWER = PixelAnswer()


def pixel_reply(app: EventsApp, exchange: Exchange, start: float, outcome: str, extra: bytes) -> None:
    app.counters.pixel[outcome] += 1
    app.reply(exchange, start, 200, PIXEL_GIF,
               b"%sX-Meteorit-Outcome: %s\r\n%s" % (PIXEL_HEADERS, outcome.encode(), extra), GIF_TYPE)


def get_snippet(app: EventsApp, exchange: Exchange, start: float, url: bytes,
                headers: dict[bytes, bytes]) -> None:
    extra = SNIPPET.headers + (app.cors_headers(headers) if app.cors.enabled else b"")
    tag = headers.get(b"if-none-match")
    if tag is not None and SNIPPET.matches(tag):
        return app.reply_bare(exchange, start, 304, extra)
    app.reply(exchange, start, 200, SNIPPET.body, extra, JS_TYPE)


Route = Callable[["EventsApp", Exchange, float, bytes, dict[bytes, bytes]], None]
GET_ROUTES: dict[bytes, Route] = {b"/v1/pixel.gif": get_pixel, b"/v1/meteorit.js": get_snippet}
