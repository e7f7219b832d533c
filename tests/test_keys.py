"""The key ring: secret keys in headers (Bearer, X-Api-Key, Basic) or a body only, public
keys in the query string too, the numbering rate limits use, and the config's rule that a
key is one or the other."""

from __future__ import annotations

import base64

import pytest

from meteorit import config
from meteorit.errors import ConfigError
from meteorit.worker.keys import INVALID_BASIC, NO_KEY, SECRET_IN_URL, KeyRing, presented_in_headers

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
    ({b"authorization": b"Digest username=k"}, None),  # not a scheme of ours
    ({b"authorization": b"Basic azo="}, b"k"),  # "k:": Segment's SDKs send the write key so
    ({b"authorization": b"basic  azo= "}, b"k"),
    ({b"x-api-key": b"a", b"authorization": b"Bearer b"}, b"a"),
])
def test_where_a_header_key_is_read(headers: dict[bytes, bytes], presented: bytes | None) -> None:
    assert presented_in_headers(headers) == presented


def basic(credentials: bytes) -> dict[bytes, bytes]:
    return {b"authorization": b"Basic " + base64.b64encode(credentials)}


def test_basic_credentials_are_a_key_with_an_empty_password() -> None:
    assert presented_in_headers(basic(b"sk-one:")) == b"sk-one"
    assert presented_in_headers(basic(b"sk-one")) == b"sk-one"  # no colon: Segment takes it too
    assert presented_in_headers(basic(b"a:b:c:")) == b"a:b:c"  # a key may hold colons
    assert RING.identify(basic(b"sk-two:")) == 1
    assert RING.identify(basic(b"pk-one:")) == 2


@pytest.mark.parametrize("authorization", [
    b"Basic " + base64.b64encode(b"sk-one:password"),  # a password is not ours to check: refused
    b"Basic !!!not-base64",
    b"Basic c2stb25lOg",  # unpadded
    b"Basic ",
    b"Basic " + base64.b64encode(b":"),
])
def test_basic_credentials_that_are_not_a_key_match_none(authorization: bytes) -> None:
    headers = {b"authorization": authorization}
    assert presented_in_headers(headers) == INVALID_BASIC
    assert RING.identify(headers) == NO_KEY
    assert RING.identify(headers, "pk-one") == NO_KEY  # it meant to authenticate: no fallback


def test_a_key_in_the_body_comes_after_the_headers_and_may_be_secret() -> None:
    assert RING.identify({}, body_key="sk-one") == 0  # a body is no URL
    assert RING.identify({}, "pk-one", body_key="sk-two") == 1
    assert RING.identify({}, body_key="nope") == NO_KEY
    assert RING.identify(basic(b"pk-one:"), body_key="sk-one") == 2
    assert RING.identify({b"x-api-key": b"wrong"}, body_key="sk-one") == NO_KEY


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
