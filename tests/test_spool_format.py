"""The spool file format as a reader sees it: records round-trip in any chunking, a stream
cut at any byte keeps exactly the whole records before the cut, damage costs only the
record it hits, and the header's cursor round-trips or its damage is told."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meteorit.config import SPOOL_FRAMING
from meteorit.worker.spool.format import (DAMAGED_CURSOR, DAMAGED_MAGIC, FOREIGN, FRAME_MAGIC,
                                          FRAME_SIZE, FRAMING, HEADER_SIZE, MAGIC, MAX_FRAME, Header,
                                          encode_frame, encode_header, parse_frames, parse_header)

requests_st = st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=5), max_size=12)


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# mostly small records, sometimes one past msgpack's bin8 and bin16 limits
payloads = st.one_of(st.binary(max_size=40),
                     st.builds(random_bytes, st.integers(0, 70_000), st.integers(0, 2**32)))
any_requests = st.lists(st.lists(payloads, max_size=5), max_size=8)  # an empty request too


def flat(requests: list[list[bytes]]) -> list[bytes]:
    return [record for request in requests for record in request]


def sample_requests(n: int = 5) -> list[list[bytes]]:
    return [[b'{"type":"t","n":%d,"i":%d}' % (r, i) for i in range(3)] for r in range(n)]


def frame_bounds(frames: list[bytes]) -> list[tuple[int, int]]:
    """Where each frame starts and ends in their concatenation."""
    bounds, pos = [], 0
    for frame in frames:
        bounds.append((pos, pos + len(frame)))
        pos += len(frame)
    return bounds


def read_in_pieces(stream: bytes, cuts: list[int], max_events: int = 1 << 62,
                   max_bytes: int = 1 << 62) -> tuple[list[bytes], list[tuple[str, int, int]], int]:
    """What a reader gets when `stream` arrives in pieces ending at `cuts`: it parses what
    it holds, keeps what was not consumed for the next piece, and says `at_eof` only once
    the last piece is in. Returns the records, the problems (kind, offset in the stream,
    length) and the bytes consumed."""
    records: list[bytes] = []
    problems: list[tuple[str, int, int]] = []
    buf, base, have = b"", 0, 0
    for end in sorted(set(cuts) | {len(stream)}):
        buf += stream[have:end]
        have = end
        at_eof = end == len(stream)
        while buf:
            parsed = parse_frames(buf, at_eof, max_events, max_bytes)
            records += parsed.records
            problems += [(p.kind, base + p.offset, p.length) for p in parsed.problems]
            buf = buf[parsed.consumed:]
            base += parsed.consumed
            if not parsed.consumed:
                assert not at_eof, "at the end of the file everything is dealt with"
                break
    return records, problems, base


def covers(problems: list[tuple[str, int, int]], start: int, end: int) -> bool:
    """Whether the problems, one after the other, span exactly [start, end)."""
    pos = start
    for _, offset, length in problems:
        if offset != pos or length <= 0:
            return False
        pos += length
    return pos == end


# --- records


@given(requests_st)
def test_records_come_back_in_order(requests: list[list[bytes]]) -> None:
    buf = b"".join(encode_frame(r) for r in requests)
    parsed = parse_frames(buf, at_eof=True)
    assert (parsed.records, parsed.consumed, parsed.problems) == (flat(requests), len(buf), [])


@settings(deadline=None)
@given(any_requests, st.data())
def test_records_come_back_whole_however_the_stream_is_split(requests: list[list[bytes]],
                                                             data: st.DataObject) -> None:
    stream = b"".join(encode_frame(r) for r in requests)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    max_events = data.draw(st.integers(1, 8) | st.just(1 << 62), label="max_events")
    max_bytes = data.draw(st.integers(1, 400) | st.just(1 << 62), label="max_bytes")
    assert read_in_pieces(stream, cuts, max_events, max_bytes) == (flat(requests), [], len(stream))


@given(requests_st, st.integers(1, 7), st.integers(1, 300))
def test_chunks_by_events_and_bytes_cover_everything_once(requests: list[list[bytes]], max_events: int,
                                                          max_bytes: int) -> None:
    buf = b"".join(encode_frame(r) for r in requests)
    got: list[bytes] = []
    pos = 0
    while pos < len(buf):
        parsed = parse_frames(buf[pos:], True, max_events, max_bytes)
        assert parsed.consumed > 0 and parsed.records  # at least one whole record per chunk
        got.extend(parsed.records)
        pos += parsed.consumed
    assert got == flat(requests)


# --- a stream cut short


def test_a_record_cut_at_any_byte_is_torn_and_the_ones_before_are_kept() -> None:
    requests = sample_requests(3)
    whole = b"".join(encode_frame(r) for r in requests[:2])
    last = encode_frame(requests[2])
    for cut in range(1, len(last)):
        parsed = parse_frames(whole + last[:cut], at_eof=True)
        assert parsed.records == flat(requests[:2])
        assert [(p.kind, p.offset, p.length) for p in parsed.problems] == [("torn", len(whole), cut)]
        assert parsed.consumed == len(whole) + cut


@settings(deadline=None)
@given(st.lists(st.lists(payloads, max_size=5), min_size=1, max_size=8), st.data())
def test_a_stream_cut_at_any_byte_yields_exactly_the_whole_records_before_the_cut(
        requests: list[list[bytes]], data: st.DataObject) -> None:
    frames = [encode_frame(r) for r in requests]
    stream = b"".join(frames)
    cut = data.draw(st.integers(0, len(stream)), label="cut")
    whole = sum(1 for _, end in frame_bounds(frames) if end <= cut)
    boundary = sum(map(len, frames[:whole]))

    at_end = parse_frames(stream[:cut], at_eof=True)  # the file ends there: the rest is torn
    assert at_end.records == flat(requests[:whole]) and at_end.consumed == cut
    problems = [(p.kind, p.offset, p.length) for p in at_end.problems]
    assert covers(problems, boundary, cut)
    if boundary < cut and FRAME_MAGIC not in stream[boundary + 1:cut]:
        assert problems == [("torn", boundary, cut - boundary)]

    so_far = parse_frames(stream[:cut], at_eof=False)  # more is coming: the rest is waited for
    assert (so_far.records, so_far.consumed, so_far.problems) == (flat(requests[:whole]), boundary, [])
    if boundary == cut:
        assert so_far.need == 0
    else:
        assert so_far.need == (FRAME_SIZE if cut - boundary < FRAME_SIZE else len(frames[whole]))


def test_an_incomplete_record_before_the_end_of_the_file_is_waited_for() -> None:
    frame = encode_frame([b"a" * 100])
    parsed = parse_frames(frame[:50], at_eof=False)
    assert (parsed.records, parsed.consumed, parsed.problems, parsed.need) == ([], 0, [], len(frame))


# --- damage


@pytest.mark.parametrize("where", ["magic", "length", "crc", "payload"])
def test_a_damaged_record_in_the_middle_is_skipped_and_the_rest_kept(where: str) -> None:
    requests = sample_requests(3)
    frames = [encode_frame(r) for r in requests]
    offset = {"magic": 0, "length": 5, "crc": 9, "payload": FRAME_SIZE + 3}[where]
    damaged = bytearray(frames[1])
    damaged[offset] ^= 0xFF
    parsed = parse_frames(frames[0] + bytes(damaged) + frames[2], at_eof=True)
    assert parsed.records == requests[0] + requests[2]
    assert [p.kind for p in parsed.problems] == ["corrupt"]
    assert parsed.problems[0].offset == len(frames[0])


@settings(deadline=None)
@given(st.lists(st.lists(payloads, min_size=1, max_size=5), min_size=1, max_size=8), st.data())
def test_a_damaged_byte_costs_only_the_record_it_is_in(requests: list[list[bytes]],
                                                       data: st.DataObject) -> None:
    frames = [encode_frame(r) for r in requests]
    hit = data.draw(st.integers(0, len(frames) - 1), label="record hit")
    start, end = frame_bounds(frames)[hit]
    stream = bytearray(b"".join(frames))
    stream[data.draw(st.integers(start, end - 1), label="byte")] ^= data.draw(st.integers(1, 255), label="xor")
    near_its_end = st.integers(max(0, end - FRAME_SIZE), min(len(stream), end + FRAME_SIZE))
    cuts = data.draw(st.lists(st.integers(0, len(stream)) | near_its_end, max_size=5), label="cuts")

    records, _, consumed = read_in_pieces(bytes(stream), cuts)  # the reader resyncs, never raises
    assert records == flat(requests[:hit] + requests[hit + 1:])
    assert consumed == len(stream)
    # in one buffer, the skipped bytes are exactly the damaged record's (read in pieces, a
    # skip may end early at a piece's end, where a magic could straddle, and go on after it)
    whole = parse_frames(bytes(stream), at_eof=True)
    assert covers([(p.kind, p.offset, p.length) for p in whole.problems], start, end)


def test_a_length_over_the_largest_record_is_damage_not_a_record_to_wait_for() -> None:
    """Else a damaged length would make the reader wait for (and read) up to 4 GiB."""
    damaged = bytearray(encode_frame([b"lost"]))
    damaged[4:8] = (MAX_FRAME + 1).to_bytes(4, "big")
    after = encode_frame([b"kept"])
    parsed = parse_frames(bytes(damaged) + after, at_eof=False)
    assert parsed.records == [b"kept"] and parsed.need == 0
    assert [(p.kind, p.offset, p.length) for p in parsed.problems] == [("corrupt", 0, len(damaged))]


@settings(max_examples=200)
@given(requests_st, st.data())
def test_garbage_never_comes_out_as_records(requests: list[list[bytes]], data: st.DataObject) -> None:
    buf = bytearray(b"".join(encode_frame(r) for r in requests))
    if buf:
        for _ in range(data.draw(st.integers(1, 4))):
            buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    parsed = parse_frames(bytes(buf), at_eof=True)
    assert parsed.consumed == len(buf)
    sent = set(flat(requests))
    assert all(record in sent for record in parsed.records)


# --- the file header


@given(st.integers(HEADER_SIZE + 1, 2**63), st.data())
def test_the_cursor_round_trips(size: int, data: st.DataObject) -> None:
    cursor = data.draw(st.integers(HEADER_SIZE, size), label="cursor")
    raw = encode_header(cursor)
    assert len(raw) == HEADER_SIZE and raw.startswith(MAGIC)
    assert parse_header(raw, size) == Header(cursor)


@given(st.integers(0, 2**64 - 1), st.integers(0, HEADER_SIZE))
def test_a_file_with_nothing_after_its_header_replays_from_there(cursor: int, size: int) -> None:
    assert parse_header(encode_header(cursor), size) == Header(HEADER_SIZE)


@given(st.integers(HEADER_SIZE + 1, 2**40), st.data())
def test_a_damaged_header_is_told_and_replays_from_the_first_record(size: int, data: st.DataObject) -> None:
    cursor = data.draw(st.integers(HEADER_SIZE, size), label="cursor")
    raw = bytearray(encode_header(cursor))
    where = data.draw(st.integers(0, HEADER_SIZE - 1), label="byte")
    raw[where] ^= data.draw(st.integers(1, 255), label="xor")
    expected = DAMAGED_MAGIC if where < len(MAGIC) else DAMAGED_CURSOR  # CRC-32 sees any one-byte change
    assert parse_header(bytes(raw), size) == Header(HEADER_SIZE, expected)


@given(st.integers(HEADER_SIZE + 1, 2**40), st.data())
def test_a_cursor_outside_the_file_is_damage(size: int, data: st.DataObject) -> None:
    cursor = data.draw(st.integers(0, HEADER_SIZE - 1) | st.integers(size + 1, 2**64 - 1), label="cursor")
    assert parse_header(encode_header(cursor), size) == Header(HEADER_SIZE, DAMAGED_CURSOR)


@given(st.integers(0, HEADER_SIZE - 1), st.integers(HEADER_SIZE, 2**40))
def test_a_header_cut_short_is_a_file_still_being_born(length: int, cursor: int) -> None:
    raw = encode_header(cursor)[:length]
    assert parse_header(raw, length) == Header(HEADER_SIZE)  # nothing to report, nothing to replay


@given(st.binary(max_size=HEADER_SIZE - 1).filter(lambda raw: not MAGIC.startswith(raw[:8])))
def test_a_short_file_that_is_no_header_is_foreign(raw: bytes) -> None:
    assert parse_header(raw, len(raw)) == Header(HEADER_SIZE, FOREIGN)


# --- what config declares


def test_the_framing_is_what_config_declares() -> None:
    array32 = len(msgpack.packb([None] * 65536)) - 65536  # a nil packs in one byte
    assert FRAMING == len(encode_header(HEADER_SIZE)) + FRAME_SIZE + array32
    assert FRAMING == SPOOL_FRAMING
