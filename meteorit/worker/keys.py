"""API keys: which keys the config accepts, and where a request may present each kind.

Owns: the secret keys (`auth.keys`: accepted in a header or a body, never in a URL), the
public write-only keys (`auth.public_keys`: in a header, a body, or as the `key` query
parameter, because a beacon and an `<img>` cannot send headers), the headers a key may come
in (`X-Api-Key`, `Authorization: Bearer`, and `Authorization: Basic` with the key as the user
name and an empty password, as Segment's SDKs send their write key), comparing a presented
key with every configured one in constant time, and the number of each key (rate limits
count by it). Must not touch: HTTP framing, the query string's grammar
(meteorit.worker.query), body formats (the Segment routes find `writeKey` in theirs), Origin
rules (the app asks meteorit.worker.cors), events, logs: a key is never logged nor put in a
record.

Numbering: the secret keys first (0..len(keys)-1), then the public keys, in config order.
"""

from __future__ import annotations

import binascii
import hmac

NO_KEY = -1  # none presented, or none that matches
SECRET_IN_URL = -2  # a secret key in the query string: refused, it must not travel in URLs

HEADER_KEY = b"x-api-key"
AUTHORIZATION = b"authorization"
QUERY_KEY = "key"


class KeyRing:
    """The keys of one config; `enabled` is False when there are none (auth off)."""

    __slots__ = ("keys", "public_from", "enabled", "public")

    def __init__(self, secret: list[str], public: list[str]) -> None:
        self.keys = [k.encode() for k in secret] + [k.encode() for k in public]
        self.public_from = len(secret)
        self.enabled = bool(self.keys)
        self.public = bool(public)  # a key may come in the query string

    def __len__(self) -> int:
        return len(self.keys)

    def is_public(self, index: int) -> bool:
        return index >= self.public_from

    def identify(self, headers: dict[bytes, bytes], query_key: str | None = None,
                 body_key: str | None = None) -> int:
        """The number of the key this request presents, NO_KEY or SECRET_IN_URL. A key in a
        header wins over one in the body (`writeKey`), which wins over one in the query
        string; a query key counts only if it is public."""
        presented = presented_in_headers(headers)
        if presented is not None:
            return self.match(presented)
        if body_key is not None:
            return self.match(body_key.encode())
        if query_key is None:
            return NO_KEY
        index = self.match(query_key.encode())
        if index >= 0 and not self.is_public(index):
            return SECRET_IN_URL
        return index

    def match(self, presented: bytes) -> int:
        """The number of `presented` among the keys, or NO_KEY. Compared with every key,
        without stopping at a match: the time taken tells nothing."""
        found = NO_KEY
        for index, key in enumerate(self.keys):
            if hmac.compare_digest(presented, key):
                found = index
        return found


def presented_in_headers(headers: dict[bytes, bytes]) -> bytes | None:
    """`X-Api-Key: KEY`, `Authorization: Bearer KEY` or `Authorization: Basic base64(KEY:)`;
    None when none is there. A Basic header that is not a key with an empty password
    presents INVALID_BASIC, which matches no key: a request that meant to authenticate is
    refused, not taken as one without a key."""
    presented = headers.get(HEADER_KEY)
    if presented is not None:
        return presented
    authorization = headers.get(AUTHORIZATION)
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        return token.strip()
    if scheme == b"basic":
        return basic_user(token.strip())
    return None


INVALID_BASIC = b""  # what a malformed Basic header presents: no configured key is empty


def basic_user(token: bytes) -> bytes:
    """The user name of HTTP Basic credentials that have an empty password (`KEY:`, or
    `KEY` alone, which Segment accepts too); INVALID_BASIC otherwise. The password is no
    second secret here: a Basic header with one is refused rather than half read."""
    try:
        credentials = binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        return INVALID_BASIC
    if credentials.endswith(b":"):
        return credentials[:-1]  # the last colon: a key may hold colons of its own
    if b":" in credentials:
        return INVALID_BASIC
    return credentials
