"""Query strings: the strict parser of `?type=open&campaign=spring` for the browser endpoints.

Owns: splitting a request target into path and query, decoding parameters the way
`application/x-www-form-urlencoded` writes them (`+` is a space, `%XX` a byte) and what a
query may hold. Must not touch: what a parameter means (the key ring reads `key`, the
pixel makes an event of the rest), sockets, Redis.

Strict, because a parameter becomes an event field or a key: a `%` without two hex digits,
bytes that are not UTF-8, an empty name or a name given twice are refusals (EventError 400),
never a crash and never a guess. The whole request target is already bounded by
`limits.max_header_size` (the HTTP layer counts it); MAX_PARAMS bounds the count.
"""

from __future__ import annotations

from ..errors import EventError

MAX_PARAMS = 64  # parameters in one query string; more is a refusal (413)
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """`/v1/pixel.gif?type=open` -> (b"/v1/pixel.gif", b"type=open"). Clients never send
    the `#fragment` of a URL."""
    path, _, query = target.partition(b"?")
    return path, query


def parse(query: bytes, max_params: int = MAX_PARAMS) -> dict[str, str]:
    """The parameters of a query string, decoded; EventError for anything malformed."""
    params: dict[str, str] = {}
    if not query:
        return params
    for part in query.split(b"&"):
        if not part:
            continue  # "a=1&&b=2": browsers and URLSearchParams skip empty pairs too
        raw_name, _, raw_value = part.partition(b"=")
        name = _decode(raw_name)
        if not name:
            raise EventError(400, "a query parameter has an empty name")
        if name in params:
            raise EventError(400, f"query parameter {_shown(name)} is given twice")
        if len(params) >= max_params:
            raise EventError(413, f"more than {max_params} query parameters")
        params[name] = _decode(raw_value)
    return params


def _decode(raw: bytes) -> str:
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" in raw:
        raw = _percent_decode(raw)
    try:
        return raw.decode("utf-8")  # strict: no replacement characters in anyone's data
    except UnicodeDecodeError:
        raise EventError(400, "the query string is not UTF-8 once percent-decoded") from None


def _percent_decode(raw: bytes) -> bytes:
    head, *pieces = raw.split(b"%")
    out = bytearray(head)
    for piece in pieces:
        if len(piece) < 2 or piece[0] not in _HEX_DIGITS or piece[1] not in _HEX_DIGITS:
            raise EventError(400, "bad percent-encoding in the query string: '%' must be followed by "
                             "two hex digits")
        out.append(int(piece[:2], 16))
        out += piece[2:]
    return bytes(out)


def _shown(name: str) -> str:
    """A client's parameter name in an error message: quoted, and short."""
    return repr(name if len(name) <= 40 else name[:40] + "...")
