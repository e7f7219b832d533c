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
from dataclasses import dataclass

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
_HEAD_CRC_AT = _HEAD.size
HEADER_SIZE = _HEAD.size + _CRC.size
PAYLOAD = PIPE_BUF - HEADER_SIZE
MAX_NAME = 255
MAX_ALERT = 32 * 1024 * 1024  # bytes of one alert body; a reader drops bigger ones
_SYNC = MAGIC + bytes([VERSION])


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ cost 14% of a reader
class Alert:
    sender_pid: int
    sender_slot: int
    alert_id: int
    reply_to: int
    name: str
    data: bytes


def encode_body(name: str, data: bytes) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME:
        raise ValueError(f"alert name must be 1 to {MAX_NAME} bytes, got {len(raw)}")
    if len(raw) + 1 + len(data) > MAX_ALERT:
        raise ValueError(f"alert of {len(data)} bytes is over the limit of {MAX_ALERT - len(raw) - 1}")
    return bytes((len(raw),)) + raw + data


def packetize(body: bytes, sender_pid: int, sender_slot: int, dest_pid: int, alert_id: int,
              reply_to: int = 0) -> list[bytes]:
    total = len(body)
    view = memoryview(body)
    packets = []
    for offset in range(0, total, PAYLOAD):
        chunk = view[offset:offset + PAYLOAD]
        flags = (FIRST if offset == 0 else 0) | (LAST if offset + PAYLOAD >= total else 0)
        head = _HEAD.pack(MAGIC, VERSION, flags, sender_pid, sender_slot, dest_pid, alert_id,
                          reply_to, total, len(chunk), crc32(chunk))
        packets.append(head + _CRC.pack(crc32(head)) + chunk)
    return packets


class _Partial:
    __slots__ = ("parts", "size", "total", "sender_slot", "reply_to")

    def __init__(self, total: int, sender_slot: int, reply_to: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.total = total
        self.sender_slot = sender_slot
        self.reply_to = reply_to


class Reassembler:
    """Turns the byte stream of one pipe into whole alerts addressed to `pid`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.buffer = bytearray()
        self.partials: dict[tuple[int, int], _Partial] = {}
        # what was dropped, and why
        self.corrupt = 0  # bad magic, version, header or payload CRC; bytes skipped to resync
        self.stale = 0  # addressed to a previous occupant of this pipe
        self.orphans = 0  # a continuation without its first packet, or a broken sequence
        self.oversized = 0

    def feed(self, data: bytes) -> list[Alert]:
        buf = self.buffer
        buf += data
        alerts: list[Alert] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            if buf[pos:pos + 3] != _SYNC:
                pos = self._resync(buf, pos + 1)
                continue
            (_, _, flags, sender_pid, sender_slot, dest_pid, alert_id, reply_to, total,
             length, payload_crc) = _HEAD.unpack_from(buf, pos)
            (head_crc,) = _CRC.unpack_from(buf, pos + _HEAD_CRC_AT)
            # the header is checked before its length is trusted: a damaged length must
            # not make the reader wait for bytes that belong to the packets behind it
            if crc32(buf[pos:pos + _HEAD_CRC_AT]) != head_crc or length > PAYLOAD:
                pos = self._resync(buf, pos + 1)
                continue
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break  # the rest of this packet is still in the pipe
            payload = bytes(buf[pos + HEADER_SIZE:stop])
            if crc32(payload) != payload_crc:
                pos = self._resync(buf, pos + 1)
                continue
            pos = stop
            if dest_pid != self.pid:
                self.stale += 1
                continue
            alert = self._assemble(flags, sender_pid, sender_slot, alert_id, reply_to, total, payload)
            if alert is not None:
                alerts.append(alert)
        del buf[:pos]
        return alerts

    def forget(self, pid: int) -> None:
        """Drop the partial alerts of a process that is gone."""
        for key in [k for k in self.partials if k[0] == pid]:
            del self.partials[key]

    @property
    def partial_bytes(self) -> int:
        return sum(p.size for p in self.partials.values())

    def _resync(self, buf: bytearray, start: int) -> int:
        self.corrupt += 1
        found = buf.find(_SYNC, start)
        if found < 0:  # keep a tail that may be the start of a magic
            return max(start, len(buf) - len(_SYNC) + 1)
        return found

    def _assemble(self, flags: int, sender_pid: int, sender_slot: int, alert_id: int,
                  reply_to: int, total: int, payload: bytes) -> Alert | None:
        key = (sender_pid, alert_id)
        if flags & FIRST:
            # a sender's packets reach a pipe in order, one alert after another: a new
            # first packet ends whatever that sender left unfinished (at most one each)
            for stale in [k for k in self.partials if k[0] == sender_pid]:
                del self.partials[stale]
                self.orphans += 1
            if total > MAX_ALERT:
                self.oversized += 1
                self.partials.pop(key, None)
                return None
            if flags & LAST:
                self.partials.pop(key, None)
                return self._alert(sender_pid, sender_slot, alert_id, reply_to, payload, total)
            partial = self.partials[key] = _Partial(total, sender_slot, reply_to)
        else:
            partial = self.partials.get(key)  # type: ignore[assignment]
            if partial is None or partial.total != total:
                self.orphans += 1
                return None
        partial.parts.append(payload)
        partial.size += len(payload)
        if partial.size > partial.total or (flags & LAST and partial.size != partial.total):
            self.orphans += 1
            del self.partials[key]
            return None
        if not flags & LAST:
            return None
        del self.partials[key]
        body = b"".join(partial.parts)
        return self._alert(sender_pid, partial.sender_slot, alert_id, partial.reply_to, body, total)

    def _alert(self, sender_pid: int, sender_slot: int, alert_id: int, reply_to: int,
               body: bytes, total: int) -> Alert | None:
        if len(body) != total or not body or body[0] == 0 or body[0] + 1 > len(body):
            self.orphans += 1
            return None
        name_end = 1 + body[0]
        try:
            name = body[1:name_end].decode()
        except UnicodeDecodeError:
            self.corrupt += 1
            return None
        return Alert(sender_pid, sender_slot, alert_id, reply_to, name, body[name_end:])
