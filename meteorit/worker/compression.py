"""Content-Encoding of request bodies: gzip and deflate, inflated with the result bounded.

Owns: which encodings a body may come in (what browsers' CompressionStream and server SDKs
send), inflating one, and its limits. Must not touch: body formats (meteorit.worker.events),
HTTP framing, sockets.

Bounds: the compressed body is already at most `limits.max_body` (the HTTP layer refuses
more), and zlib is asked for at most `limit + 1` bytes of output, so a small body that
would inflate past the limit stops there, 413, without inflating the rest (a 1 KiB bomb
that would make 1 GiB costs a request one limit's worth of inflating). The CPU of a request
is so bounded by inflating at most `max_body` bytes out of at most `max_body` bytes in.
One stream per body: data after its end is refused rather than inflated as another
member, so the count of streams (and their setup cost) cannot grow with the body.
"""

from __future__ import annotations

import zlib

from ..errors import EventError

IDENTITY = "identity"
GZIP = "gzip"
DEFLATE = "deflate"
ENCODINGS = {b"identity": IDENTITY, b"gzip": GZIP, b"x-gzip": GZIP, b"deflate": DEFLATE}
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer
_ZLIB_WBITS = zlib.MAX_WBITS  # RFC 1950, what HTTP's "deflate" means
_RAW_WBITS = -zlib.MAX_WBITS  # bare RFC 1951, what some clients send as "deflate" anyway


def encoding_of(header: bytes) -> str | None:
    """The encoding a Content-Encoding header names, or None when it is not one we inflate
    (several encodings, "br", "zstd", ...: 415)."""
    return ENCODINGS.get(header.strip().lower())


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded from `encoding`; EventError 413 past `limit` bytes, 400 when corrupt."""
    if encoding == IDENTITY:
        return body
    inflater = zlib.decompressobj(_GZIP_WBITS if encoding == GZIP else _deflate_wbits(body))
    try:
        # zlib stops once it has made limit + 1 bytes: enough to know the body is too large
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise EventError(400, f"body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise EventError(413, f"body inflates past the limit of {limit} bytes")
    if not inflater.eof:
        raise EventError(400, f"{encoding} body is truncated")
    if inflater.unused_data:
        raise EventError(400, f"data after the end of the {encoding} stream")
    return out


def _deflate_wbits(body: bytes) -> int:
    """A zlib stream starts with a header whose two bytes are a multiple of 31 and name
    method 8; anything else is taken as a bare deflate stream."""
    if len(body) >= 2 and body[0] & 0x0F == 8 and ((body[0] << 8) | body[1]) % 31 == 0:
        return _ZLIB_WBITS
    return _RAW_WBITS
