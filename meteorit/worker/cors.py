"""CORS: which web page origins may call the browser endpoints, and the headers that say so.

Owns: matching an `Origin` header against `http.cors_origins` (exact origins, `*.` for the
subdomains of one, `*` for any) and the response headers of a preflight (`OPTIONS`) and of
an allowed origin's request. Must not touch: routing, keys, counters (the app counts the
refusals), sockets.

The allowed origin is echoed (never `*`), with `Vary: Origin`, so caches keep one answer per
origin. No credentials mode: meteorit authenticates with keys, never cookies, so
`Access-Control-Allow-Credentials` is never sent and a page cannot make the browser send
its cookies to meteorit. A refused origin gets no CORS header at all: the browser then
withholds the response from the page (and, after a refused preflight, never sends the
request).
"""

from __future__ import annotations

import re

MAX_AGE = 7200  # seconds a browser may cache a preflight (Chromium caps it at 2 hours)
ALLOWED_HEADERS = b"Content-Type, Authorization, X-Api-Key, Content-Encoding"
# A page reads Retry-After on a 429 or 503 to know when to try again; it is not one of
# the response headers CORS shows a page by default.
EXPOSED_HEADERS = b"Retry-After"
ANY = "*"
# What a browser sends as Origin (scheme://host[:port], or "null"): checked before an origin
# is echoed under "*", so no byte of a client's header goes back unless it is one of these.
_ORIGIN_RE = re.compile(rb"^(?:[a-z][a-z0-9+.-]*://[a-z0-9_.\-\[\]:]+|null)$")
_SUBDOMAIN_RE = re.compile(rb"^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*$")


class CorsPolicy:
    """The origins of one config (validated and lowercased by meteorit.config)."""

    __slots__ = ("enabled", "any", "exact", "wildcards")

    def __init__(self, origins: list[str]) -> None:
        self.enabled = bool(origins)
        self.any = ANY in origins
        self.exact = frozenset(o.encode() for o in origins if o != ANY and "://*." not in o)
        # "https://*.shop.example:8443" -> (b"https://", b".shop.example:8443")
        self.wildcards = [(scheme.encode() + b"://", b"." + rest.encode())
                          for scheme, _, rest in (o.partition("://*.") for o in origins if "://*." in o)]

    def allows(self, origin: bytes) -> bool:
        origin = origin.lower()
        if origin in self.exact:
            return True
        if not _ORIGIN_RE.match(origin):
            return False
        if self.any:
            return True
        for prefix, suffix in self.wildcards:
            if origin.startswith(prefix) and origin.endswith(suffix):
                # the subdomain labels only: "https://.shop.example" or "https://a/b.shop.example" are not
                sub = origin[len(prefix):len(origin) - len(suffix)]
                if sub and _SUBDOMAIN_RE.match(sub):
                    return True
        return False

    @staticmethod
    def response_headers(origin: bytes) -> bytes:
        """For an allowed origin's request: lets its page read the response."""
        return (b"Access-Control-Allow-Origin: %s\r\nAccess-Control-Expose-Headers: %s\r\nVary: Origin\r\n"
                % (origin, EXPOSED_HEADERS))

    @staticmethod
    def preflight_headers(origin: bytes, methods: bytes) -> bytes:
        """For an allowed origin's OPTIONS: the methods and request headers a page may use."""
        return (b"Access-Control-Allow-Origin: %s\r\nAccess-Control-Allow-Methods: %s\r\n"
                b"Access-Control-Allow-Headers: %s\r\nAccess-Control-Max-Age: %d\r\nVary: Origin\r\n"
                % (origin, methods, ALLOWED_HEADERS, MAX_AGE))
