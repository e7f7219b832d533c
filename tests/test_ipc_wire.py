"""The IPC wire format as a reader on a pipe sees it: alerts of every size cut into packets
and put back together, packets of many senders interleaved, the byte stream cut anywhere,
and what must be dropped (stale, orphan, corrupt packets, dead senders) without costing
anything else."""

from __future__ import annotations

import math
import random
import select
from collections import defaultdict, deque
from typing import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meteorit.bus.wire import (HEADER_SIZE, MAX_ALERT, MAX_NAME, PAYLOAD, Alert, Reassembler,
                               encode_body, packetize)

READER = 4242  # the pid of the process reading the pipe
FLUSH_PID = 4343  # the sender of the traffic after damage (see FLUSH)
SYNC = b"MI\x01"  # magic and version: where a packet starts

names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)  # 1..160 bytes
pids = st.integers(1, 2**32 - 1).filter(lambda pid: pid not in (READER, FLUSH_PID))
slots = st.integers(-1, 64)  # -1 is the master
alert_ids = st.integers(1, 2**32 - 1)
reply_tos = st.integers(0, 2**32 - 1)


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# small data most of the time, sometimes several packets' worth
datas = st.one_of(
    st.binary(max_size=64),
    st.builds(random_bytes, st.integers(0, 4 * PAYLOAD), st.integers(0, 2**32)),
)


def packets_of(alert: Alert, dest: int = READER) -> list[bytes]:
    return packetize(encode_body(alert.name, alert.data), alert.sender_pid, alert.sender_slot,
                     dest, alert.alert_id, alert.reply_to)


def cut(stream: bytes, sizes: Iterable[int]) -> list[bytes]:
    """The stream in chunks of the given sizes, then the rest in one chunk."""
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(stream[pos:pos + size])
        pos += size
    chunks.append(stream[pos:])
    return chunks


def feed_all(reader: Reassembler, chunks: Iterable[bytes]) -> list[Alert]:
    out: list[Alert] = []
    for chunk in chunks:
        out += reader.feed(chunk)
    return out


def by_sender(alerts: Iterable[Alert]) -> dict[int, list[Alert]]:
    grouped: dict[int, list[Alert]] = defaultdict(list)
    for alert in alerts:
        grouped[alert.sender_pid].append(alert)
    return dict(grouped)


def merge(per_sender: Sequence[Sequence[object]], rnd: random.Random) -> list[object]:
    """A random interleaving that keeps each sender's items in order, as packets of many
    writers land in one pipe."""
    queues = [deque(items) for items in per_sender if items]
    merged = []
    while queues:
        index = rnd.randrange(len(queues))
        merged.append(queues[index].popleft())
        if not queues[index]:
            del queues[index]
    return merged


@st.composite
def senders(draw: st.DrawFn, max_senders: int = 5, max_alerts: int = 6) -> list[list[Alert]]:
    """Several senders, each with a few alerts numbered on from a random first id."""
    count = draw(st.integers(1, max_senders))
    sender_pids = draw(st.lists(pids, min_size=count, max_size=count, unique=True))
    result = []
    for pid in sender_pids:
        slot = draw(slots)
        first_id = draw(st.integers(1, 2**32 - 1 - max_alerts))
        contents = draw(st.lists(st.tuples(names, datas, reply_tos), max_size=max_alerts))
        result.append([Alert(pid, slot, first_id + i, reply_to, name, data)
                       for i, (name, data, reply_to) in enumerate(contents)])
    return result


def assert_clean(reader: Reassembler) -> None:
    assert (reader.corrupt, reader.stale, reader.orphans, reader.oversized) == (0, 0, 0, 0)
    assert reader.partial_bytes == 0


# --- one alert, at every boundary of the body size

NAME = "boundary"
OVERHEAD = 1 + len(NAME.encode())  # body = 1 + len(name) + len(data)


@pytest.mark.parametrize("body_size, packet_count", [
    (OVERHEAD, 1),  # no data
    (OVERHEAD + 1, 1),  # one byte of data
    (PAYLOAD - 1, 1),
    (PAYLOAD, 1),  # exactly one full packet
    (PAYLOAD + 1, 2),
    (2 * PAYLOAD, 2),
    (2 * PAYLOAD + 1, 3),
], ids=["data-0", "data-1", "payload-1", "payload", "payload+1", "2payloads", "2payloads+1"])
def test_an_alert_round_trips_at_every_body_size_boundary(body_size: int, packet_count: int) -> None:
    sent = Alert(1234, 3, 7, 0, NAME, random_bytes(body_size - OVERHEAD, body_size))
    packets = packets_of(sent)
    assert len(packets) == packet_count
    assert all(len(p) <= select.PIPE_BUF for p in packets)
    reader = Reassembler(READER)
    # packet by packet: nothing comes out before the last one
    for packet in packets[:-1]:
        assert reader.feed(packet) == []
    assert reader.feed(packets[-1]) == [sent]
    assert_clean(reader)


def test_a_body_of_exactly_one_payload_fills_one_pipe_buf_packet() -> None:
    packets = packets_of(Alert(1, 0, 1, 0, NAME, bytes(PAYLOAD - OVERHEAD)))
    assert [len(p) for p in packets] == [select.PIPE_BUF]


@pytest.mark.parametrize("name", ["n" * MAX_NAME, "é" * (MAX_NAME // 2), "ü", "a.b/c"])
def test_names_of_1_to_255_utf8_bytes_round_trip(name: str) -> None:
    sent = Alert(99, -1, 1, 5, name, b"")
    assert Reassembler(READER).feed(b"".join(packets_of(sent))) == [sent]


def test_a_10_mib_alert_round_trips_in_random_reads() -> None:
    data = random_bytes(10 * 1024 * 1024, 10)
    sent = Alert(555, 1, 2**32 - 1, 2**32 - 1, "big", data)
    stream = b"".join(packets_of(sent))
    rnd = random.Random(1)
    sizes = []
    total = 0
    while total < len(stream):  # reads of 1 byte up to a whole read buffer
        sizes.append(rnd.choice([1, 31, 32, 33, select.PIPE_BUF, rnd.randint(1, 256 * 1024)]))
        total += sizes[-1]
    reader = Reassembler(READER)
    assert feed_all(reader, cut(stream, sizes)) == [sent]
    assert_clean(reader)


def test_the_largest_alert_round_trips() -> None:
    sent = Alert(7, 0, 1, 0, "max", bytes(MAX_ALERT - 4))
    reader = Reassembler(READER)
    assert reader.feed(b"".join(packets_of(sent))) == [sent]
    assert_clean(reader)


@settings(deadline=None)
@given(name=names, size=st.integers(0, 8 * PAYLOAD), seed=st.integers(0, 2**32),
       pid=pids, slot=slots, alert_id=alert_ids, reply_to=reply_tos,
       sizes=st.lists(st.integers(1, 2 * select.PIPE_BUF), max_size=20))
def test_any_alert_round_trips_in_the_fewest_pipe_buf_packets(
        name: str, size: int, seed: int, pid: int, slot: int, alert_id: int, reply_to: int,
        sizes: list[int]) -> None:
    sent = Alert(pid, slot, alert_id, reply_to, name, random_bytes(size, seed))
    packets = packets_of(sent)
    body_size = 1 + len(name.encode()) + size
    assert len(packets) == math.ceil(body_size / PAYLOAD)
    assert all(HEADER_SIZE < len(p) <= select.PIPE_BUF for p in packets)
    reader = Reassembler(READER)
    assert feed_all(reader, cut(b"".join(packets), sizes)) == [sent]
    assert_clean(reader)


# --- many senders, interleaved, the stream cut anywhere


@settings(deadline=None)
@given(alerts=senders(), rnd=st.randoms(use_true_random=False),
       sizes=st.lists(st.integers(1, 2 * select.PIPE_BUF), max_size=40))
def test_interleaved_senders_in_any_chunking_deliver_every_alert_once_in_order(
        alerts: list[list[Alert]], rnd: random.Random, sizes: list[int]) -> None:
    stream = b"".join(merge([[p for a in mine for p in packets_of(a)] for mine in alerts], rnd))
    reader = Reassembler(READER)
    got = feed_all(reader, cut(stream, sizes))
    assert by_sender(got) == {mine[0].sender_pid: mine for mine in alerts if mine}
    assert_clean(reader)
    assert not reader.buffer


@settings(deadline=None, max_examples=30)
@given(alerts=senders(max_senders=3, max_alerts=3), rnd=st.randoms(use_true_random=False))
def test_interleaved_senders_fed_one_byte_at_a_time(alerts: list[list[Alert]],
                                                    rnd: random.Random) -> None:
    stream = b"".join(merge([[p for a in mine for p in packets_of(a)] for mine in alerts], rnd))
    reader = Reassembler(READER)
    got = feed_all(reader, (stream[i:i + 1] for i in range(len(stream))))
    assert by_sender(got) == {mine[0].sender_pid: mine for mine in alerts if mine}
    assert_clean(reader)


def test_a_stream_split_at_every_byte_boundary() -> None:
    small = Alert(10, 0, 1, 0, "a", b"x")
    big = Alert(11, 1, 1, 0, "b", random_bytes(PAYLOAD + 100, 0))  # two packets
    last = Alert(10, 0, 2, 1, "c", b"")
    big_first, big_second = packets_of(big)
    stream = packets_of(small)[0] + big_first + packets_of(last)[0] + big_second
    for split in range(len(stream) + 1):
        reader = Reassembler(READER)
        got = reader.feed(stream[:split]) + reader.feed(stream[split:])
        assert by_sender(got) == {10: [small, last], 11: [big]}, split
        assert_clean(reader)


# --- what a reader must drop, and what it must not lose meanwhile


@given(ours=senders(max_senders=3), theirs=senders(max_senders=3), other_dest=pids,
       rnd=st.randoms(use_true_random=False))
@settings(deadline=None)
def test_packets_addressed_to_another_pid_are_dropped_as_stale(
        ours: list[list[Alert]], theirs: list[list[Alert]], other_dest: int,
        rnd: random.Random) -> None:
    # e.g. what a dead worker left unread in the pipe its successor now reads
    mine = [[p for a in alerts for p in packets_of(a)] for alerts in ours]
    stale = [[p for a in alerts for p in packets_of(a, dest=other_dest)] for alerts in theirs]
    reader = Reassembler(READER)
    got = reader.feed(b"".join(merge(mine + stale, rnd)))
    assert by_sender(got) == {alerts[0].sender_pid: alerts for alerts in ours if alerts}
    assert reader.stale == sum(map(len, stale))
    assert (reader.corrupt, reader.orphans, reader.partial_bytes) == (0, 0, 0)


@pytest.mark.parametrize("skip", [1, 2])
def test_continuations_without_their_first_packet_are_orphans(skip: int) -> None:
    # a reader that starts in the middle of an alert
    cut_off = Alert(20, 0, 1, 0, "big", random_bytes(3 * PAYLOAD, 1))  # 4 packets
    after = [Alert(20, 0, 2, 0, "next", b"1"), Alert(21, 1, 1, 0, "other", random_bytes(PAYLOAD, 2))]
    tail = packets_of(cut_off)[skip:]
    reader = Reassembler(READER)
    got = reader.feed(b"".join(tail + [p for a in after for p in packets_of(a)]))
    assert got == after
    assert reader.orphans == len(tail)
    assert (reader.corrupt, reader.stale, reader.partial_bytes) == (0, 0, 0)


def test_a_new_first_packet_replaces_an_unfinished_alert_with_the_same_id() -> None:
    unfinished = Alert(30, 0, 9, 0, "a", random_bytes(2 * PAYLOAD, 3))
    again = Alert(30, 0, 9, 0, "b", b"whole")
    reader = Reassembler(READER)
    got = reader.feed(packets_of(unfinished)[0] + b"".join(packets_of(again)))
    assert got == [again]
    assert reader.orphans == 1
    assert reader.partial_bytes == 0


def test_an_alert_over_the_limit_is_dropped_and_the_next_ones_arrive() -> None:
    body = b"\x01x" + bytes(MAX_ALERT - 1)  # one byte over the limit
    oversized = packetize(body, 40, 0, READER, 1)
    after = Alert(40, 0, 2, 0, "ok", b"fine")
    reader = Reassembler(READER)
    got = reader.feed(oversized[0] + oversized[1] + b"".join(packets_of(after)))
    assert got == [after]
    assert reader.oversized == 1
    assert reader.orphans == 1  # its second packet
    assert reader.partial_bytes == 0


# Corruption never happens in a pipe (writes of at most PIPE_BUF bytes are atomic), but a
# reader must survive it. A packet cut short inside its payload has a good header that
# claims bytes that are not there, so the reader waits for that many before it can see
# the payload CRC fail: the streams below end with an alert of two full packets from
# another sender, traffic that arrives after the damage and lets the reader get past it.
# Damage short of such a cut holds nothing back (the tests after these).
FLUSH = Alert(FLUSH_PID, 5, 1, 0, "flush", bytes(2 * PAYLOAD - 6))


@st.composite
def corruptions(draw: st.DrawFn, packet: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "insert"]))
    if kind == "flip":
        at = draw(st.integers(0, len(packet) - 1))
        return packet[:at] + bytes([packet[at] ^ draw(st.integers(1, 255))]) + packet[at + 1:]
    if kind == "truncate":
        return packet[:draw(st.integers(1, len(packet) - 1))]
    at = draw(st.integers(1, len(packet) - 1))
    return packet[:at] + draw(st.binary(min_size=1, max_size=64)) + packet[at:]


@settings(deadline=None)
@given(alerts=senders(max_senders=4, max_alerts=4), rnd=st.randoms(use_true_random=False),
       data=st.data())
def test_a_corrupt_packet_costs_only_its_own_alert(alerts: list[list[Alert]], rnd: random.Random,
                                                   data: st.DataObject) -> None:
    tagged = merge([[(a, p) for a in mine for p in packets_of(a)] for mine in alerts], rnd)
    if not tagged:
        return
    index = data.draw(st.integers(0, len(tagged) - 1), label="corrupted packet")
    victim, packet = tagged[index]  # type: ignore[misc]
    damaged = data.draw(corruptions(packet), label="damaged packet")
    stream = [p for _, p in tagged]  # type: ignore[misc]
    stream[index] = damaged
    sizes = data.draw(st.lists(st.integers(1, 2 * select.PIPE_BUF), max_size=20), label="reads")
    reader = Reassembler(READER)
    got = feed_all(reader, cut(b"".join(stream + packets_of(FLUSH)), sizes))
    delivered = by_sender(got)
    # bytes inserted may leave a whole copy of the packet behind them ("MI" + "MI\x02...",
    # or into a run of equal bytes): then the victim arrives whole, never changed
    expected = [[a for a in mine if a != victim or victim in delivered.get(a.sender_pid, [])]
                for mine in alerts] + [[FLUSH]]
    assert delivered == {mine[0].sender_pid: mine for mine in expected if mine}
    assert reader.corrupt >= 1
    assert reader.stale == 0


@settings(deadline=None)
@given(alerts=senders(max_senders=4, max_alerts=4), rnd=st.randoms(use_true_random=False),
       data=st.data())
def test_garbage_before_and_between_packets_is_skipped(alerts: list[list[Alert]],
                                                       rnd: random.Random,
                                                       data: st.DataObject) -> None:
    packets = merge([[p for a in mine for p in packets_of(a)] for mine in alerts], rnd)
    garbage = data.draw(st.lists(st.one_of(st.binary(max_size=80), st.just(SYNC)),
                                 min_size=len(packets) + 1, max_size=len(packets) + 1),
                        label="garbage before each packet and at the end")
    stream = b"".join(g + p for g, p in zip(garbage, packets + [b""]))  # type: ignore[operator]
    sizes = data.draw(st.lists(st.integers(1, 2 * select.PIPE_BUF), max_size=20), label="reads")
    reader = Reassembler(READER)
    got = feed_all(reader, cut(stream + b"".join(packets_of(FLUSH)), sizes))
    expected = [*alerts, [FLUSH]]
    assert by_sender(got) == {mine[0].sender_pid: mine for mine in expected if mine}
    assert (reader.corrupt > 0) == any(garbage)
    assert (reader.stale, reader.orphans, reader.partial_bytes) == (0, 0, 0)


LENGTH_AT = 26  # offset of the payload length field in the header


def with_length(packet: bytes, length: int) -> bytes:
    return packet[:LENGTH_AT] + length.to_bytes(2, "big") + packet[LENGTH_AT + 2:]


@pytest.mark.parametrize("length", [PAYLOAD, 1000, 0xFFFF, 0, 5],
                         ids=["payload", "1000", "max", "zero", "shorter"])
def test_a_damaged_length_field_costs_its_packet_and_the_packets_behind_come_out_at_once(
        length: int) -> None:
    victim = Alert(80, 0, 1, 0, "victim", b"lost in transit")
    behind = [Alert(81, 1, 1, 0, "a", b"one"), Alert(80, 0, 2, 0, "b", b"two"),
              Alert(82, 2, 1, 7, "c", random_bytes(100, 8))]
    damaged = with_length(packets_of(victim)[0], length)
    reader = Reassembler(READER)
    # no further bytes: the header CRC fails before the reader trusts the length
    assert reader.feed(damaged + b"".join(p for a in behind for p in packets_of(a))) == behind
    assert reader.corrupt >= 1
    assert not reader.buffer
    assert (reader.stale, reader.orphans, reader.partial_bytes) == (0, 0, 0)


def test_a_damaged_length_in_a_middle_packet_costs_only_that_alert() -> None:
    victim = Alert(83, 0, 1, 0, "big", random_bytes(3 * PAYLOAD, 9))  # 4 packets
    behind = [Alert(84, 1, 1, 0, "next", b"x"), Alert(83, 0, 2, 0, "again", b"y")]
    packets = packets_of(victim)
    packets[1] = with_length(packets[1], 10)
    reader = Reassembler(READER)
    assert reader.feed(b"".join(packets + [p for a in behind for p in packets_of(a)])) == behind
    assert reader.corrupt >= 1
    assert reader.orphans == 1  # the victim's last packet ends a sequence with a hole in it
    assert reader.partial_bytes == 0


@st.composite
def damages_that_hold_nothing(draw: st.DrawFn, packet: bytes) -> bytes:
    """Damage a reader sees without waiting for more bytes: a flipped byte anywhere,
    bytes inserted anywhere, or the packet cut inside its header."""
    kind = draw(st.sampled_from(["flip", "insert", "cut-header"]))
    if kind == "flip":
        at = draw(st.integers(0, len(packet) - 1))
        return packet[:at] + bytes([packet[at] ^ draw(st.integers(1, 255))]) + packet[at + 1:]
    if kind == "cut-header":
        return packet[:draw(st.integers(1, HEADER_SIZE - 1))]
    at = draw(st.integers(1, len(packet) - 1))
    return packet[:at] + draw(st.binary(min_size=1, max_size=64)) + packet[at:]


@settings(deadline=None)
@given(alerts=senders(max_senders=4, max_alerts=4), rnd=st.randoms(use_true_random=False),
       data=st.data())
def test_damage_short_of_a_cut_payload_holds_back_none_of_the_packets_behind_it(
        alerts: list[list[Alert]], rnd: random.Random, data: st.DataObject) -> None:
    tagged = merge([[(a, p) for a in mine for p in packets_of(a)] for mine in alerts], rnd)
    if not tagged:
        return
    index = data.draw(st.integers(0, len(tagged) - 1), label="damaged packet")
    victim, packet = tagged[index]  # type: ignore[misc]
    stream = [p for _, p in tagged]  # type: ignore[misc]
    stream[index] = data.draw(damages_that_hold_nothing(packet), label="damaged")
    sizes = data.draw(st.lists(st.integers(1, 2 * select.PIPE_BUF), max_size=20), label="reads")
    reader = Reassembler(READER)
    got = feed_all(reader, cut(b"".join(stream), sizes))  # and no traffic after it
    delivered = by_sender(got)
    # bytes inserted may leave the checked ones as they were (see the test above): then
    # the victim arrives whole, never changed
    expected = [[a for a in mine if a != victim or victim in delivered.get(a.sender_pid, [])]
                for mine in alerts]
    assert delivered == {mine[0].sender_pid: mine for mine in expected if mine}
    # damage at the very end of the stream that leaves fewer bytes than a header (a header
    # cut short, bytes inserted after a payload they left intact) is waited on, not judged yet
    waiting = index == len(stream) - 1 and 0 < len(reader.buffer) < HEADER_SIZE
    assert reader.corrupt >= 1 or waiting
    assert reader.stale == 0


@pytest.mark.parametrize("split", [1, 2, 3], ids=["after-M", "after-MI", "after-MI-version"])
def test_garbage_then_a_packet_split_right_after_its_first_bytes(split: int) -> None:
    # the reader must keep a tail that may be the start of the next magic
    garbage = bytes(range(0x20, 0x40)) * 3  # no "M" in it
    sent = Alert(70, 0, 1, 0, "a", b"kept")
    packet = packets_of(sent)[0]
    reader = Reassembler(READER)
    assert reader.feed(garbage + packet[:split]) == []
    assert reader.feed(packet[split:]) == [sent]
    assert reader.corrupt >= 1


def test_the_decoded_names_a_reader_keeps_are_bounded_and_every_name_still_arrives() -> None:
    reader = Reassembler(READER)
    sent = [Alert(90, 0, i + 1, 0, f"name-{i}", b"") for i in range(Reassembler.MAX_NAMES + 500)]
    assert feed_all(reader, (p for a in sent for p in packets_of(a))) == sent
    assert len(reader.names) == Reassembler.MAX_NAMES
    assert feed_all(reader, packets_of(Alert(90, 0, 9999, 0, "name-1", b"again"))) == [
        Alert(90, 0, 9999, 0, "name-1", b"again")]


def test_an_alert_in_progress_holds_its_own_bytes_not_the_reads_they_came_in() -> None:
    big = Alert(95, 0, 1, 0, "big", random_bytes(3 * PAYLOAD, 11))
    small = [Alert(96, 1, i + 1, 0, "s", bytes(100)) for i in range(500)]
    packets = packets_of(big)
    reader = Reassembler(READER)
    for packet in packets[:-1]:  # each in a read of ~70 KiB, the rest small alerts
        assert reader.feed(packet + b"".join(p for a in small for p in packets_of(a))) == small
    held = sum(len(part.obj) if isinstance(part, memoryview) else len(part)
               for part in reader.partials[95].parts)
    assert held <= len(packets) * select.PIPE_BUF
    assert reader.feed(packets[-1]) == [big]


# --- dead senders


def test_forget_frees_a_dead_senders_partial_alert() -> None:
    dead = Alert(50, 2, 1, 0, "half", random_bytes(3 * PAYLOAD, 4))
    alive = Alert(51, 3, 1, 0, "mid", random_bytes(PAYLOAD + 1, 5))  # two packets
    dead_packets, alive_packets = packets_of(dead), packets_of(alive)
    reader = Reassembler(READER)
    # the dead sender got two packets out; another sender is halfway through its own alert
    assert reader.feed(dead_packets[0] + alive_packets[0] + dead_packets[1]) == []
    assert reader.partial_bytes == 2 * PAYLOAD + PAYLOAD
    reader.forget(50)
    assert reader.partial_bytes == PAYLOAD  # only the live sender's partial is left
    later = Alert(52, 4, 1, 0, "later", b"x")
    assert reader.feed(alive_packets[1] + b"".join(packets_of(later))) == [alive, later]
    assert reader.partial_bytes == 0
    # had the dead sender's last packets still been in the pipe, they would be orphans
    assert reader.feed(b"".join(dead_packets[2:])) == []
    assert reader.orphans == 2
    assert reader.partial_bytes == 0


def test_forget_of_an_unknown_pid_changes_nothing() -> None:
    sent = Alert(60, 0, 1, 0, "a", random_bytes(PAYLOAD + 1, 6))
    first, second = packets_of(sent)
    reader = Reassembler(READER)
    reader.feed(first)
    reader.forget(61)
    assert reader.feed(second) == [sent]


# --- encode_body


@pytest.mark.parametrize("name", ["", "n" * (MAX_NAME + 1), "é" * 128],
                         ids=["empty", "256-ascii", "256-utf8"])
def test_encode_body_rejects_a_name_of_0_or_over_255_bytes(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        encode_body(name, b"")


def test_encode_body_lays_out_name_length_name_and_data() -> None:
    assert encode_body("é", b"data") == b"\x02\xc3\xa9data"
    assert encode_body("n" * MAX_NAME, b"") == bytes([MAX_NAME]) + b"n" * MAX_NAME


def test_encode_body_takes_up_to_max_alert_bytes_and_rejects_one_more() -> None:
    assert len(encode_body("n", bytes(MAX_ALERT - 2))) == MAX_ALERT
    with pytest.raises(ValueError, match="over the limit"):
        encode_body("n", bytes(MAX_ALERT - 1))
