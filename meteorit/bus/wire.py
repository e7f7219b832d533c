"""The IPC wire format: alerts cut into packets of at most PIPE_BUF bytes, and their
reassembly on the reading side.

Owns: the packet layout, packetization and reassembly. Must not touch: file
descriptors, event loops, handlers (meteorit.ipc does those).

Packet layout (network byte order, 36-byte header, then the payload):

    offset size field
    0      2    magic b"MI"
    2      1    version (2)
    3      1    flags: FIRST = 1, LAST = 2 (a whole alert is FIRST|LAST, a middle one 0)
    4      4    sender pid
    8      2    sender slot (-1 = the master)
    10     4    destination pid: the fence. A pipe outlives its readers (a respawned
                worker reads its predecessor's pipe), so a reader drops every packet
                addressed to another pid: nothing stale reaches a successor.
    14     4    alert id, per sender, never 0
    18     4    reply_to: the alert id this alert answers, 0 if none
    22     4    total: bytes of the whole alert body
    26     2    payload length of this packet
    28     4    CRC-32 of the payload
    32     4    CRC-32 of bytes 0..31: the header's own

Alert body: 1 byte name length, the name (UTF-8, 1..255 bytes), then the data. The body
is cut into payloads of at most PAYLOAD bytes, so the name travels in the first packet.
A reader reassembles per (sender pid, alert id); packets of one alert arrive in order
because a sender writes one destination's queue in order.

Damage costs only the packet it hits. The header CRC is checked as soon as the 36 header
bytes are in: a bad magic, version or header CRC (a damaged length field among them)
sends the reader to the next magic at once, so a wrong length never makes it wait for
bytes that belong to later packets. The payload CRC is checked once the payload is in;
a bad one resyncs the same way. Only a packet cut short inside its payload (a writer
breaking the one-write rule) can hold the packets behind it until more bytes arrive.
"""

from __future__ import annotations

import select
import struct
import zlib
from typing import NamedTuple

try:  # the same CRC-32 as zlib's, 5x faster (PCLMUL): a 10 KiB alert is CRC'd on both sides
    from isal.isal_zlib import crc32
except ImportError:  # no wheel for this platform: the same values, slower
    crc32 = zlib.crc32

MAGIC = b"MI"
VERSION = 2  # 1 had one CRC over the whole packet, checked only once all of it was in
FIRST = 1
LAST = 2
PIPE_BUF = select.PIPE_BUF
_HEAD = struct.Struct("!2sBBIhIIIIHI")  # the header up to its own CRC
_CRC = struct.Struct("!I")
_HEADER = struct.Struct(_HEAD.format + "I")  # the whole header, read in one call
HEADER_SIZE = _HEADER.size
WHOLE = FIRST | LAST
PAYLOAD = PIPE_BUF - HEADER_SIZE
MAX_NAME = 255
MAX_ALERT = 32 * 1024 * 1024  # bytes of one alert body; a reader drops bigger ones
_SYNC = MAGIC + bytes([VERSION])


class Alert(NamedTuple):
    # a tuple: the reader makes one per alert with tuple.__new__, far cheaper than any __init__
    sender_pid: int
    sender_slot: int
    alert_id: int
    reply_to: int
    name: str
    data: bytes


_new_alert = tuple.__new__


def name_prefix(name: str) -> bytes:
    """The start of an alert body: the name's length byte and the name."""
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME:
        raise ValueError(f"alert name must be 1 to {MAX_NAME} bytes, got {len(raw)}")
    return bytes((len(raw),)) + raw


def check_size(prefix: bytes, data: bytes) -> None:
    if len(prefix) + len(data) > MAX_ALERT:
        raise ValueError(f"alert of {len(data)} bytes is over the limit of {MAX_ALERT - len(prefix)}")


def encode_body(name: str, data: bytes) -> bytes:
    prefix = name_prefix(name)
    check_size(prefix, data)
    return prefix + data


def whole_packet(prefix: bytes, payload_crc: int, data: bytes, sender_pid: int, sender_slot: int,
                 dest_pid: int, alert_id: int, reply_to: int) -> bytes:
    """The one packet of an alert whose body (prefix + data) fits in PAYLOAD bytes;
    payload_crc is crc32(data, crc32(prefix)): a sender keeps each name's prefix CRC."""
    length = len(prefix) + len(data)
    head = _HEAD.pack(MAGIC, VERSION, WHOLE, sender_pid, sender_slot, dest_pid, alert_id, reply_to,
                      length, length, payload_crc)
    return b"".join((head, _CRC.pack(crc32(head)), prefix, data))


Payloads = list[tuple[int, bytes | memoryview, int]]  # (flags, payload, its CRC-32)


def cut_body(prefix: bytes, data: bytes) -> Payloads:
    """An alert body (prefix + data) cut into payloads, each with its CRC: computed once
    however many destinations the alert has."""
    view = memoryview(data)
    first = PAYLOAD - len(prefix)
    head = b"".join((prefix, view[:first]))
    payloads: Payloads = [(FIRST, head, crc32(head))]
    for offset in range(first, len(data), PAYLOAD):
        chunk = view[offset:offset + PAYLOAD]
        payloads.append((0, chunk, crc32(chunk)))
    flags, payload, payload_crc = payloads[-1]
    payloads[-1] = (flags | LAST, payload, payload_crc)
    return payloads


def frame(payloads: Payloads, total: int, sender_pid: int, sender_slot: int, dest_pid: int,
          alert_id: int, reply_to: int = 0) -> list[bytes]:
    """The packets of one alert to one destination."""
    packets = []
    for flags, payload, payload_crc in payloads:
        head = _HEAD.pack(MAGIC, VERSION, flags, sender_pid, sender_slot, dest_pid, alert_id,
                          reply_to, total, len(payload), payload_crc)
        packets.append(b"".join((head, _CRC.pack(crc32(head)), payload)))
    return packets


def packetize(body: bytes, sender_pid: int, sender_slot: int, dest_pid: int, alert_id: int,
              reply_to: int = 0) -> list[bytes]:
    if not body:
        return []
    return frame(cut_body(b"", body), len(body), sender_pid, sender_slot, dest_pid, alert_id, reply_to)


class _Partial:
    """An alert of several packets being put back together: a sender has at most one."""
    __slots__ = ("alert_id", "total", "sender_slot", "reply_to", "name", "parts", "size", "copied")

    def __init__(self, alert_id: int, total: int, sender_slot: int, reply_to: int, name: str,
                 first: memoryview, size: int) -> None:
        self.alert_id = alert_id
        self.total = total
        self.sender_slot = sender_slot
        self.reply_to = reply_to
        self.name = name
        self.parts: list[bytes | memoryview] = [first]  # the data, without the name
        self.size = size  # payload bytes received, the name's included, to compare with total
        self.copied = 0  # parts before this one are copies, the others views of the last read

    def own(self) -> None:
        """Copy the parts that are views of the read just parsed: a view would keep all of
        a 64 KiB read alive for 4 KiB of an alert in progress, 16 times its size. (An alert
        that ends in the read it started in is joined from views, with no copy before.)"""
        parts = self.parts
        for i in range(self.copied, len(parts)):
            parts[i] = bytes(parts[i])
        self.copied = len(parts)


class Reassembler:
    """Turns the byte stream of one pipe into whole alerts addressed to `pid`."""

    MAX_NAMES = 1024  # decoded names kept: alerts mostly reuse a few names

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.buffer = b""  # the start of a packet whose rest is still in the pipe
        self.partials: dict[int, _Partial] = {}  # by sender pid
        self.names: dict[bytes, tuple[str, int]] = {}  # body prefix -> (name, prefix CRC)
        # what was dropped, and why
        self.corrupt = 0  # bad magic, version, header or payload CRC, name; bytes skipped to resync
        self.stale = 0  # addressed to a previous occupant of this pipe
        self.orphans = 0  # a continuation without its first packet, or a broken sequence
        self.oversized = 0

    def feed(self, data: bytes) -> list[Alert]:
        # bytes, not a bytearray: a whole alert's data is one slice of it, a bigger alert's
        # payloads are views joined once at its end
        data = bytes(data)
        alerts: list[Alert] = []
        old = self.buffer
        if old and len(data) > PIPE_BUF:
            # the packet cut by the end of the last read ends in the first PIPE_BUF bytes:
            # join only those to the leftover, not the whole read
            joined = old + data[:PIPE_BUF]
            pos = self._parse(joined, 0, len(old), alerts)
            if pos >= len(old):
                old, pos = b"", pos - len(old)
            else:  # cannot happen (a packet is at most PIPE_BUF bytes): join it all
                old, data, pos = b"", joined[pos:] + data[PIPE_BUF:], 0
        else:
            pos = 0
        if old:
            data = old + data
        pos = self._parse(data, pos, len(data), alerts)
        self.buffer = data[pos:]
        for partial in self.partials.values():
            partial.own()
        return alerts

    def _parse(self, buf: bytes, pos: int, limit: int, alerts: list[Alert]) -> int:
        """Packets from `pos` on while they start before `limit`; returns where it stopped."""
        end = len(buf)
        view = memoryview(buf)
        unpack = _HEADER.unpack_from
        partials = self.partials
        names = self.names
        me = self.pid
        while pos < limit and end - pos >= HEADER_SIZE:
            (magic, version, flags, sender_pid, sender_slot, dest_pid, alert_id, reply_to, total,
             length, payload_crc, head_crc) = unpack(buf, pos)
            start = pos + HEADER_SIZE
            # the header is checked before its length is trusted: a damaged length must
            # not make the reader wait for bytes that belong to the packets behind it
            if (magic != MAGIC or version != VERSION or length > PAYLOAD
                    or crc32(buf[pos:start - 4]) != head_crc):
                pos = self._resync(buf, pos + 1)
                continue
            stop = start + length
            if stop > end:
                break  # the rest of this packet is still in the pipe
            if flags == WHOLE and 0 < length == total and length > buf[start] > 0:
                # the common case, a whole alert: its data is the one copy made
                data_at = start + 1 + buf[start]
                prefix = buf[start:data_at]
                known = names.get(prefix)
                data = buf[data_at:stop]
                if crc32(data, known[1] if known else crc32(prefix)) != payload_crc:
                    pos = self._resync(buf, pos + 1)
                    continue
                pos = stop
                if dest_pid != me:
                    self.stale += 1
                    continue
                if partials and partials.pop(sender_pid, None) is not None:
                    self.orphans += 1  # a new first packet ends what its sender left unfinished
                name = known[0] if known else self._name(prefix)
                if name is not None:
                    alerts.append(_new_alert(Alert, (sender_pid, sender_slot, alert_id, reply_to, name, data)))
                continue
            payload = view[start:stop]  # copied by feed() if its alert is still in progress
            if crc32(payload) != payload_crc:
                pos = self._resync(buf, pos + 1)
                continue
            pos = stop
            if dest_pid != me:
                self.stale += 1
                continue
            partial = None if flags & FIRST else partials.get(sender_pid)
            if partial is not None and partial.alert_id == alert_id and partial.total == total:
                partial.parts.append(payload)  # the next packet of an alert in progress
                partial.size += length
                if partial.size > total or (flags & LAST and partial.size != total):
                    self.orphans += 1  # more bytes than announced, or fewer when it says last
                    del partials[sender_pid]
                elif flags & LAST:
                    del partials[sender_pid]
                    alerts.append(_new_alert(Alert, (sender_pid, partial.sender_slot, alert_id,
                                                     partial.reply_to, partial.name, b"".join(partial.parts))))
            elif flags & FIRST:
                alert = self._first(flags, sender_pid, sender_slot, alert_id, reply_to, total, payload)
                if alert is not None:
                    alerts.append(alert)
            else:
                self.orphans += 1  # a continuation of no alert in progress
        return pos

    def forget(self, pid: int) -> None:
        """Drop the partial alert of a process that is gone."""
        self.partials.pop(pid, None)

    @property
    def partial_bytes(self) -> int:
        return sum(p.size for p in self.partials.values())

    def _resync(self, buf: bytes, start: int) -> int:
        self.corrupt += 1
        found = buf.find(_SYNC, start)
        if found < 0:  # keep a tail that may be the start of a magic
            return max(start, len(buf) - len(_SYNC) + 1)
        return found

    def _name(self, prefix: bytes) -> str | None:
        """The name in a body's prefix (length byte and name); kept with the prefix's CRC."""
        try:
            name = prefix[1:].decode()
        except UnicodeDecodeError:
            self.corrupt += 1
            return None
        if len(self.names) < self.MAX_NAMES:
            self.names[prefix] = (name, crc32(prefix))
        return name

    def _first(self, flags: int, sender_pid: int, sender_slot: int, alert_id: int, reply_to: int,
               total: int, payload: memoryview) -> Alert | None:
        # a sender's packets reach a pipe in order, one alert after another: a new first
        # packet ends whatever that sender left unfinished
        if self.partials.pop(sender_pid, None) is not None:
            self.orphans += 1
        if total > MAX_ALERT:
            self.oversized += 1
            return None
        length = len(payload)
        # the name is in the first packet: PAYLOAD holds the longest
        if not length or not 0 < payload[0] < length or length > total or (flags & LAST and length != total):
            self.orphans += 1
            return None
        name_end = payload[0] + 1
        prefix = bytes(payload[:name_end])
        known = self.names.get(prefix)
        name = known[0] if known else self._name(prefix)
        if name is None:
            return None
        if flags & LAST:
            return _new_alert(Alert, (sender_pid, sender_slot, alert_id, reply_to, name,
                                      bytes(payload[name_end:])))
        self.partials[sender_pid] = _Partial(alert_id, total, sender_slot, reply_to, name,
                                             payload[name_end:], length)
        return None
