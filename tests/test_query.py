"""The query-string parser: form decoding, strictness (a refusal, never a crash or a guess)
and its limits; a property test against the encoder browsers use (URLSearchParams' rules,
as urllib.parse.urlencode writes them)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meteorit.errors import EventError
from meteorit.worker.query import MAX_PARAMS, parse, split_target


def test_split_target() -> None:
    assert split_target(b"/v1/pixel.gif?type=open&a=b") == (b"/v1/pixel.gif", b"type=open&a=b")
    assert split_target(b"/v1/events") == (b"/v1/events", b"")
    assert split_target(b"/x?a=1?b") == (b"/x", b"a=1?b")


@pytest.mark.parametrize(("query", "params"), [
    (b"", {}),
    (b"type=open&campaign=spring", {"type": "open", "campaign": "spring"}),
    (b"q=a+b%20c", {"q": "a b c"}),
    (b"name=%C3%A9t%C3%A9&e=%E2%82%AC", {"name": "été", "e": "€"}),
    (b"plus=%2B&amp=%26&eq=%3D", {"plus": "+", "amp": "&", "eq": "="}),
    (b"a=1&&b=2&", {"a": "1", "b": "2"}),  # empty pairs are skipped, as browsers do
    (b"flag&empty=", {"flag": "", "empty": ""}),
    (b"x=a=b", {"x": "a=b"}),
    (b"nul=%00", {"nul": "\x00"}),
])
def test_parameters_are_form_decoded(query: bytes, params: dict[str, str]) -> None:
    assert parse(query) == params


@pytest.mark.parametrize(("query", "status", "words"), [
    (b"a=%", 400, "percent-encoding"),
    (b"a=%4", 400, "percent-encoding"),
    (b"a=%zz", 400, "percent-encoding"),
    (b"a=%C3%28", 400, "UTF-8"),  # a broken two-byte sequence
    (b"a=%FF", 400, "UTF-8"),
    (b"a=\xff", 400, "UTF-8"),  # a raw byte that is no UTF-8
    (b"=x", 400, "empty name"),
    (b"a=1&a=2", 400, "twice"),
    (b"&".join(b"p%d=1" % i for i in range(MAX_PARAMS + 1)), 413, "more than"),
])
def test_malformed_queries_are_refused_with_a_reason(query: bytes, status: int, words: str) -> None:
    with pytest.raises(EventError) as refused:
        parse(query)
    assert refused.value.status == status and words in refused.value.reason


def test_as_many_parameters_as_the_limit_pass() -> None:
    assert len(parse(b"&".join(b"p%d=1" % i for i in range(MAX_PARAMS)))) == MAX_PARAMS


def test_a_long_name_is_cut_in_the_error() -> None:
    with pytest.raises(EventError) as refused:
        parse(b"n" * 5000 + b"=1&" + b"n" * 5000 + b"=2")
    assert len(refused.value.reason) < 100


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=20))
def test_what_a_browser_encodes_comes_back(params: dict[str, str]) -> None:
    assert parse(urlencode(params).encode()) == params


@given(st.binary(max_size=200))
def test_any_bytes_give_parameters_or_an_event_error(raw: bytes) -> None:
    try:
        params = parse(raw)
    except EventError as exc:
        assert exc.status in (400, 413)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
