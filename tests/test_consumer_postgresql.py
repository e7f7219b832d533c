"""consumer.postgresql's rows for COPY, without a server: the `ts` column's text and a
batch that can be gone through again (the staging path COPies it a second time)."""

from __future__ import annotations

import orjson

from meteorit.consumer import rows as rowslib
from meteorit.consumer.postgresql import PgRows


def test_copy_rows_give_ts_as_json_text_and_can_be_read_twice() -> None:
    values = [None, "2026-01-01", 1795000000000, -5, 1.5, 1e16, 0.1]
    recs = [orjson.dumps({"id": str(i), "type": "t", "received_at": i, **({} if v is None else {"ts": v})})
            for i, v in enumerate(values)]
    rows = PgRows(rowslib.decode(recs))
    first = list(rows)
    assert first == list(rows) and len(rows) == len(values)
    assert [ts for _, _, ts, _, _ in first] == [None, "2026-01-01", "1795000000000", "-5", "1.5", "1e+16", "0.1"]
    assert [(ident, kind, received_at, event) for ident, kind, _, received_at, event in first] == [
        (str(i), "t", i, rec.decode()) for i, rec in enumerate(recs)]
