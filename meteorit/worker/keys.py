"""API keys: which keys the config accepts, and where a request may present each kind.

Owns: the secret keys (`auth.keys`: accepted in a header only), the public write-only keys
(`auth.public_keys`: in a header, or as the `key` query parameter, because a beacon and an
`<img>` cannot send headers), comparing a presented key with every configured one in
constant time, and the number of each key (rate limits count by it). Must not touch: HTTP
framing, the query string's grammar (meteorit.worker.query), Origin rules (the app asks
meteorit.worker.cors), events, logs: a key is never logged nor put in a record.

Numbering: the secret keys first (0..len(keys)-1), then the public keys, in config order.
"""

from __future__ import annotations

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

    def identify(self, headers: dict[bytes, bytes], query_key: str | None = None) -> int:
        """The number of the key this request presents, NO_KEY or SECRET_IN_URL. A key in a
        header wins over one in the query string; a query key counts only if it is public."""
        presented = presented_in_headers(headers)
        if presented is not None:
            return self.match(presented)
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
    """`X-Api-Key: KEY` or `Authorization: Bearer KEY`; None when neither is there."""
    presented = headers.get(HEADER_KEY)
    if presented is not None:
        return presented
    authorization = headers.get(AUTHORIZATION)
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip()
