"""The key ring: secret keys in headers only, public keys in a header or the query string,
the numbering rate limits use, and the config's rule that a key is one or the other."""

from __future__ import annotations

import pytest

from meteorit import config
from meteorit.errors import ConfigError
from meteorit.worker.keys import NO_KEY, SECRET_IN_URL, KeyRing, presented_in_headers

RING = KeyRing(["sk-one", "sk-two"], ["pk-one"])


def test_numbering_secret_keys_first_then_public_ones() -> None:
    assert len(RING) == 3 and RING.enabled and RING.public
    assert [RING.match(k) for k in (b"sk-one", b"sk-two", b"pk-one", b"pk-on", b"")] == [0, 1, 2, NO_KEY, NO_KEY]
    assert [RING.is_public(i) for i in range(3)] == [False, False, True]


def test_no_keys_is_auth_off() -> None:
    assert not KeyRing([], []).enabled
    assert KeyRing([], ["pk"]).enabled  # public keys alone turn auth on


@pytest.mark.parametrize(("headers", "presented"), [
    ({}, None),
    ({b"x-api-key": b"k"}, b"k"),
    ({b"authorization": b"Bearer k"}, b"k"),
    ({b"authorization": b"bearer   k  "}, b"k"),
    ({b"authorization": b"Basic azo="}, None),  # not a scheme of ours
    ({b"x-api-key": b"a", b"authorization": b"Bearer b"}, b"a"),
])
def test_where_a_header_key_is_read(headers: dict[bytes, bytes], presented: bytes | None) -> None:
    assert presented_in_headers(headers) == presented


def test_a_public_key_may_come_in_the_query_string() -> None:
    assert RING.identify({}, "pk-one") == 2
    assert RING.identify({b"x-api-key": b"pk-one"}) == 2


def test_a_secret_key_in_the_query_string_is_not_taken() -> None:
    assert RING.identify({}, "sk-one") == SECRET_IN_URL
    assert RING.identify({b"x-api-key": b"sk-one"}) == 0


def test_a_header_key_wins_over_the_query_string() -> None:
    assert RING.identify({b"x-api-key": b"wrong"}, "pk-one") == NO_KEY
    assert RING.identify({b"authorization": b"Bearer sk-two"}, "pk-one") == 1


def test_nothing_presented_is_no_key() -> None:
    assert RING.identify({}) == NO_KEY
    assert RING.identify({}, "unknown") == NO_KEY


def test_a_key_cannot_be_both_secret_and_public() -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(env={}, overrides={"auth.keys": ["a", "b"], "auth.public_keys": ["b"]})
    assert refused.value.key == "auth.public_keys" and "b" not in refused.value.reason.split()
