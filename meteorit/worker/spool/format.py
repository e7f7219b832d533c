"""The spool file format: bytes in, records out, as pure functions.

Owns: the byte layout of a spool file, encoding a header and a record, and the rules a
reader follows on damage (what it skips, where it resyncs). Must not touch: files, locks,
threads, asyncio, Redis, logging: the caller reads the bytes and reports the problems.

Layout (integers big-endian, unsigned; CRC-32 as `zlib.crc32` computes it):

    offset  size  file header, once, at offset 0                      HEADER_SIZE = 20
         0     8  MAGIC  b"MTRSPOOL"
         8     8  cursor (u64): offset of the first record not yet replayed
        16     4  crc32 of the 8 cursor bytes
    then records, one after the other up to the end of the file:
    offset  size  record                                              FRAME_SIZE = 12 + payload
         0     4  FRAME_MAGIC  b"\\xa7MSR"
         4     4  length (u32) of the payload, at most MAX_FRAME
         8     4  crc32 of the 4 length bytes followed by the payload
        12     n  payload: one request's queue records as a msgpack array of bin strings

A request is one record: it is spooled whole or not at all. FRAMING is what a file holding
one request adds around its records: the header, the record header and the msgpack
array32 header (5 bytes); config declares the same figure as SPOOL_FRAMING.

The cursor is moved by the replay once Redis has the records before it. A header cannot
be trusted when:
- it is shorter than HEADER_SIZE: a prefix of MAGIC is a file whose creator was killed
  while writing it (nothing after it, nothing to report), anything else is FOREIGN;
- its MAGIC is damaged (DAMAGED_MAGIC): the file is a spool if a FRAME_MAGIC follows the
  header (the caller looks), else it is foreign; a spool replays from the first record;
- its cursor fails its CRC or lies outside [HEADER_SIZE, file size] (DAMAGED_CURSOR):
  replay from the first record. Duplicates rather than losses, either way.

Records are read from a buffer that starts on a record boundary. A record that runs past
the end of the file is torn (its process died mid-write) and skipped; at the end of a
buffer that is not the end of the file it is waited for instead (`Parsed.need`). Any other
damage (a bad magic, a length over MAX_FRAME or past the end while a later FRAME_MAGIC
exists, a CRC mismatch, a payload that is no array of bin strings) is corrupt: the reader
skips to the next FRAME_MAGIC and checks the record there like any other. The CRC guards
against damage, not forgery: a payload that holds a whole valid record can be mistaken for
one once the record around it is damaged.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import msgpack

MAGIC = b"MTRSPOOL"
HEADER = struct.Struct(">8sQI")  # magic, cursor, crc32 of the cursor's 8 bytes
HEADER_SIZE = HEADER.size
FRAME_MAGIC = b"\xa7MSR"
FRAME = struct.Struct(">4sII")  # magic, payload length, crc32 of length + payload
FRAME_SIZE = FRAME.size
MAX_FRAME = 256 * 1024 * 1024  # a larger length field is damage, not a record
FRAMING = HEADER_SIZE + FRAME_SIZE + 5  # a file of one request: header, record header, msgpack array32

# What is wrong with a header (`Header.damage`)
DAMAGED_MAGIC = "magic"
DAMAGED_CURSOR = "cursor"
FOREIGN = "foreign"


# --- the file header


@dataclass(frozen=True)
class Header:
    """What a file's first bytes say about where its replay starts."""

    cursor: int  # the stored cursor, or the first record when that cannot be trusted
    damage: str | None = None  # None, DAMAGED_MAGIC, DAMAGED_CURSOR or FOREIGN


def encode_header(cursor: int) -> bytes:
    raw = cursor.to_bytes(8, "big")
    return HEADER.pack(MAGIC, cursor, zlib.crc32(raw))


def parse_header(raw: bytes, size: int) -> Header:
    """The header in `raw`, the first HEADER_SIZE bytes of a file of `size` bytes (fewer
    when the file is shorter)."""
    if len(raw) < HEADER_SIZE:
        if MAGIC.startswith(raw[:8]):
            return Header(HEADER_SIZE)  # killed while writing the header: there is nothing after it
        return Header(HEADER_SIZE, FOREIGN)
    magic, cursor, crc = HEADER.unpack_from(raw)
    if magic != MAGIC:
        return Header(HEADER_SIZE, DAMAGED_MAGIC)
    if size <= HEADER_SIZE:
        return Header(HEADER_SIZE)  # nothing after the header (killed between a cut-back and its cursor)
    if zlib.crc32(raw[8:16]) != crc or not HEADER_SIZE <= cursor <= size:
        return Header(HEADER_SIZE, DAMAGED_CURSOR)
    return Header(cursor)


# --- records


def encode_frame(records: list[bytes]) -> bytes:
    payload = msgpack.packb(records, use_bin_type=True)
    length = len(payload).to_bytes(4, "big")
    return FRAME.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload, zlib.crc32(length))) + payload


@dataclass
class Problem:
    """A stretch of a spool file that holds no record: torn (at the end) or corrupt."""

    kind: str  # "torn" or "corrupt"
    offset: int  # from the start of the parsed buffer (the caller rebases it)
    length: int


@dataclass
class Parsed:
    records: list[bytes] = field(default_factory=list)
    consumed: int = 0  # bytes of the buffer dealt with: records read and damage skipped
    problems: list[Problem] = field(default_factory=list)
    need: int = 0  # when nothing could be consumed: bytes the next record needs in one buffer


def parse_frames(buf: bytes, at_eof: bool, max_events: int = 1 << 62,
                 max_bytes: int = 1 << 62) -> Parsed:
    """The whole records at the start of `buf`, at least one and then up to `max_events`
    records / `max_bytes` bytes. `at_eof` says `buf` ends where the file ends, so a record
    cut short there is torn rather than still to be read."""
    out = Parsed()
    view = memoryview(buf)
    n = len(buf)
    pos = 0
    while pos < n:
        if out.records and (len(out.records) >= max_events or pos >= max_bytes):
            break
        if n - pos < FRAME_SIZE:
            if not at_eof:
                out.need = FRAME_SIZE
                break
            out.problems.append(Problem("torn", pos, n - pos))
            pos = n
            break
        magic, length, crc = FRAME.unpack_from(buf, pos)
        if magic != FRAME_MAGIC or length > MAX_FRAME:
            pos = _resync(buf, pos, at_eof, out)
            continue
        end = pos + FRAME_SIZE + length
        if end > n:
            if not at_eof:
                out.need = end - pos
                break
            later = buf.find(FRAME_MAGIC, pos + 1)
            if later == -1:  # nothing after it: the last write was cut short
                out.problems.append(Problem("torn", pos, n - pos))
                pos = n
                break
            out.problems.append(Problem("corrupt", pos, later - pos))  # a damaged length
            pos = later
            continue
        payload = view[pos + FRAME_SIZE:end]
        items = _decode_payload(payload, length, crc)
        if items is None:
            pos = _resync(buf, pos, at_eof, out)
            continue
        if out.records and (len(out.records) + len(items) > max_events or end > max_bytes):
            break  # this record starts the next chunk
        out.records.extend(items)
        pos = end
    out.consumed = pos
    return out


def _decode_payload(payload: memoryview, length: int, crc: int) -> list[bytes] | None:
    if zlib.crc32(payload, zlib.crc32(length.to_bytes(4, "big"))) != crc:
        return None
    try:
        items = msgpack.unpackb(payload, raw=True)
    except (ValueError, msgpack.UnpackException):
        return None
    if not isinstance(items, list) or not all(isinstance(i, bytes) for i in items):
        return None
    return items


def _resync(buf: bytes, pos: int, at_eof: bool, out: Parsed) -> int:
    """Skip damaged bytes at `pos` up to the next FRAME_MAGIC (the record there is then
    checked like any other); returns the new position."""
    later = buf.find(FRAME_MAGIC, pos + 1)
    if later == -1:
        # keep the last bytes: a magic may straddle the end of this buffer
        later = len(buf) if at_eof else max(pos + 1, len(buf) - len(FRAME_MAGIC) + 1)
    out.problems.append(Problem("corrupt", pos, later - pos))
    return later
