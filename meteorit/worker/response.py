"""Wire bytes of HTTP/1.1 responses.

Owns: status lines (built once at import), the Date header (refreshed once a second by
the worker's tick, not per request) and the framing of a response. Must not touch:
sockets or request handling.
"""

from __future__ import annotations

import http
from email.utils import formatdate

import orjson

STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus
}

CONNECTION_CLOSE = b"Connection: close\r\n"
CONNECTION_KEEP_ALIVE = b"Connection: keep-alive\r\n"
JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain; charset=utf-8"

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
RETRY_AFTER = b"Retry-After: 1\r\n"  # with a 503: the load that made it passes within seconds


# Responses built this second, by what they are made of: nearly every answer under load is
# one of a few (202 {"accepted":1}), and a lookup costs a third of formatting one. Emptied
# when the Date changes; small answers only, and a bounded number of them.
_built: dict[tuple[int, bytes, bytes, bytes, bytes], bytes] = {}
BUILT_MAX = 256
BUILT_MAX_BODY = 128


class Clock:
    """The current Date header value; `tick()` once a second keeps it fresh."""

    date = formatdate(usegmt=True).encode()

    @classmethod
    def tick(cls) -> None:
        date = formatdate(usegmt=True).encode()
        if date != cls.date:
            cls.date = date
            _built.clear()


def build(status: int, body: bytes, connection: bytes = b"", extra: bytes = b"",
          content_type: bytes = JSON_TYPE) -> bytes:
    """A whole response. `connection` is b"" (HTTP/1.1 keep-alive), CONNECTION_CLOSE or
    CONNECTION_KEEP_ALIVE (HTTP/1.0 keep-alive); `extra` is more header lines."""
    key = (status, body, connection, extra, content_type)
    data = _built.get(key)
    if data is None:
        data = b"%sServer: meteorit\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
            STATUS_LINES[status], Clock.date, content_type, len(body), connection, extra, body)
        if len(body) <= BUILT_MAX_BODY and len(_built) < BUILT_MAX:
            _built[key] = data
    return data


def build_bare(status: int, connection: bytes = b"", extra: bytes = b"") -> bytes:
    """A response that has no content by definition (204, 304): no Content-Type, and no
    Content-Length, which RFC 9110 forbids on a 204 and on a 304 says the size of the 200."""
    return b"%sServer: meteorit\r\nDate: %s\r\n%s%s\r\n" % (STATUS_LINES[status], Clock.date, connection, extra)


def error_body(message: str, index: int | None = None) -> bytes:
    if index is None:
        return orjson.dumps({"error": message})
    return orjson.dumps({"error": message, "index": index})
