"""consumer.rows: the fast decoder (msgspec, a whole batch at once) and the general one
(orjson, record by record) must sort every record the same way, with the same values;
what the fast one cannot check (UTF-8 in the fields it skips) the batch still checks."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from meteorit.consumer import rows as rowslib

GOOD = [b'{"type":"a","id":"1","received_at":5,"ts":3}', b'{"type":"b","id":"2","received_at":9}']


def one_by_one(recs: list[bytes]) -> rowslib.Rows:
    """What the general decoder alone makes of `recs`."""
    rows = rowslib.Rows()
    for record in recs:
        rowslib._decode_general(record, rows)
    return rows


def same(a: rowslib.Rows, b: rowslib.Rows) -> bool:
    return (a.columns, a.records, a.dead, a.newest_received_at) == (b.columns, b.records, b.dead,
                                                                     b.newest_received_at)


def test_invalid_utf8_in_a_field_the_consumer_does_not_read_is_a_dead_letter() -> None:
    """msgspec skips such a field without checking its bytes; the record is still not
    storable as text, and the other records of its batch are stored as they are."""
    bad = b'{"type":"c","id":"3","received_at":7,"url":"\xff"}'
    rows = rowslib.decode([GOOD[0], bad, GOOD[1]])
    assert rows.ids == ["1", "2"] and rows.records == [GOOD[0], GOOD[1]]
    assert rows.events == [GOOD[0].decode(), GOOD[1].decode()]
    assert [record for record, _ in rows.dead] == [bad]
    assert rows.dead[0][1].startswith("not valid JSON")


def test_a_ts_beyond_64_bits_in_a_batch_is_decoded_as_alone() -> None:
    """The fast decoder refuses it (its ts must fit 64 bits): the general one takes it, and
    the record's neighbours get the same values either way."""
    huge = b'{"type":"h","id":"4","received_at":8,"ts":18446744073709551615}'
    rows = rowslib.decode([GOOD[0], huge, GOOD[1]])
    assert rows.ids == ["1", "4", "2"] and rows.ts == [3, None, None] and rows.dead == []
    assert same(rows, one_by_one([GOOD[0], huge, GOOD[1]]))


json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
fields = st.fixed_dictionaries({}, optional={
    "id": json_values | st.text(min_size=120, max_size=140), "type": json_values | st.just(""),
    "received_at": json_values | st.integers(-2**64, 2**64), "ts": json_values})


def dumps(value: Any) -> bytes:
    """JSON as any producer might write it; integers of any size (orjson stops at 64 bits)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


records = (fields.flatmap(lambda f: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(
    lambda extra: dumps({**extra, **f})))
           | json_values.map(dumps) | st.binary(max_size=40))


@settings(max_examples=400, deadline=None)
@given(st.lists(records, max_size=6))
def test_the_fast_decoder_sorts_and_reads_every_record_as_the_general_one(recs: list[bytes]) -> None:
    assert same(rowslib.decode(recs), one_by_one(recs))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=128), st.text(min_size=1, max_size=256),
                          st.integers(-2**63, 2**63 - 1), st.none() | st.integers(-2**63, 2**63 - 1)
                          | st.floats(allow_nan=False, allow_infinity=False) | st.text()),
                min_size=1, max_size=8))
def test_a_batch_of_valid_records_takes_the_fast_path_and_keeps_every_value(rows: list[tuple[Any, ...]]) -> None:
    recs = [orjson.dumps({"id": i, "type": t, "received_at": r, "ts": ts}) for i, t, r, ts in rows]
    with mock.patch.object(rowslib, "_decode_one_by_one", side_effect=AssertionError("left the fast path")):
        decoded = rowslib.decode(recs)
    assert decoded.dead == []
    assert decoded.columns == [v for (i, t, r, ts), rec in zip(rows, recs) for v in (i, t, ts, r, rec.decode())]
    assert decoded.newest_received_at == max(0, *(r for _, _, r, _ in rows))
