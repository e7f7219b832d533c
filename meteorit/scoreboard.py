"""The scoreboard: one shared memory segment per worker slot, where each worker keeps its
latest counters so that the master can still read them once the worker is gone.

Owns: the segments (anonymous `MAP_SHARED` mappings made by the master before fork, like
the IPC pipes, so every worker inherits them), their layout, and writing and reading a
snapshot without ever handing out a torn one. After fork a worker keeps only its own
slot's segment (`keep_only`).
Must not touch: what a snapshot means (metrics.py), the bus, processes. It stores bytes
(a msgpack snapshot) and checks nothing of their content.

Why shared memory and not a message: a worker killed with SIGKILL sends nothing, and the
totals must not lose what it counted (nginx keeps its stub_status counters in shared
memory for the same reason). The worker writes a snapshot once a second, whenever it
answers a stats gather (so the board never holds less than a scrape saw) and as it exits;
the master reads a slot when its worker died (and adds it to the totals of exited
workers, once) or did not answer a scrape in time.

Layout of one slot: two buffers of BUFFER_SIZE bytes, written in turn (a writer killed
in the middle of one leaves the other intact). A buffer is a 16-byte header, then the
payload:

    offset 0   u64 little-endian  sequence: odd while a write is under way, even once done
    offset 8   u32                payload length
    offset 12  u32                CRC-32 of the payload
    offset 16  payload            at most BUFFER_SIZE - 16 bytes

A write makes the sequence odd, copies length, CRC and payload, then makes it even and
one past the other buffer's (a seqlock). A reader copies a buffer, checks the sequence is
even and unchanged across the copy and the CRC matches, and takes the valid buffer with
the highest sequence, if the other buffer has not completed a newer write meanwhile (else
it looks again): a concurrent write, a write cut short by SIGKILL, or a stray store never
yields a torn snapshot, nor one older than a read before it.
"""

from __future__ import annotations

import mmap
import struct
import zlib

HEADER = struct.Struct("<QII")  # sequence, payload length, CRC-32 of the payload
BUFFER_SIZE = 8192  # a worker's snapshot is under 1 KiB (720 bytes with every status): room to grow
SLOT_SIZE = 2 * BUFFER_SIZE
MAX_PAYLOAD = BUFFER_SIZE - HEADER.size
DAMAGED = -1  # the sequence _read_buffer gives a buffer that is complete but fails its checks
READ_TRIES = 8  # a reader racing a writer that completed a write during its copy tries again


class Scoreboard:
    """The segments of slots 0..slots-1; the master makes it before the first fork."""

    def __init__(self, slots: int) -> None:
        self._maps: dict[int, mmap.mmap] = {
            slot: mmap.mmap(-1, SLOT_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            for slot in range(slots)}
        self._sequence: dict[int, int] = {}  # the writer's last sequence, per slot

    def keep_only(self, slot: int) -> None:
        """In a worker after fork: unmap every other slot's segment, so a worker can
        neither read nor damage its siblings' counters."""
        for other in [s for s in self._maps if s != slot]:
            self._maps.pop(other).close()

    def close(self) -> None:
        for segment in self._maps.values():
            segment.close()
        self._maps.clear()

    # --- the worker's side

    def write(self, slot: int, payload: bytes) -> bool:
        """Publish `payload` as the slot's latest snapshot; False if it is too large (the
        previous one stays)."""
        if len(payload) > MAX_PAYLOAD:
            return False
        segment = self._maps[slot]
        if slot not in self._sequence:  # a new worker in this slot continues the sequence
            self._sequence[slot] = max((_sequence_of(segment, i) for i in (0, 1)), default=0)
        sequence = (self._sequence[slot] | 1) + 1  # the next even number
        offset = (sequence // 2 % 2) * BUFFER_SIZE  # buffers alternate; the older one is overwritten
        struct.pack_into("<Q", segment, offset, sequence - 1)  # odd: under way
        segment[offset + HEADER.size:offset + HEADER.size + len(payload)] = payload
        struct.pack_into("<II", segment, offset + 8, len(payload), zlib.crc32(payload))
        struct.pack_into("<Q", segment, offset, sequence)  # even: done
        self._sequence[slot] = sequence
        return True

    # --- the master's side

    def read(self, slot: int) -> bytes | None:
        """The slot's latest complete snapshot, or None when it holds none (or, with its
        worker alive and writing, when READ_TRIES copies in a row raced a write)."""
        segment = self._maps[slot]
        for _ in range(READ_TRIES):
            found = [_read_buffer(segment, index * BUFFER_SIZE) for index in (0, 1)]
            whole = [(sequence, index) for index, (sequence, payload) in enumerate(found) if payload is not None]
            if not whole:
                if all(sequence in (0, DAMAGED) for sequence, _ in found):
                    return None  # never written, cleared, or nothing intact
                continue  # a write under way: look again
            sequence, index = max(whole)
            # the latest only if the other buffer has completed no newer write since the copy
            other = _sequence_of(segment, 1 - index)
            if found[1 - index][0] == DAMAGED or other <= sequence + 1:
                return found[index][1]
        return None

    def clear(self, slot: int) -> None:
        """Forget the slot's snapshots: its next worker starts from nothing. Only when no
        worker of the slot runs (after its exit was reaped, before the next fork)."""
        segment = self._maps[slot]
        segment[:HEADER.size] = bytes(HEADER.size)
        segment[BUFFER_SIZE:BUFFER_SIZE + HEADER.size] = bytes(HEADER.size)
        self._sequence.pop(slot, None)


def _sequence_of(segment: mmap.mmap, index: int) -> int:
    return struct.unpack_from("<Q", segment, index * BUFFER_SIZE)[0]


def _read_buffer(segment: mmap.mmap, offset: int) -> tuple[int, bytes | None]:
    """(sequence, payload) of a buffer: payload None while it is empty (sequence 0) or
    being written; (DAMAGED, None) when a stable, complete-looking buffer fails its checks."""
    before, length, crc = HEADER.unpack_from(segment, offset)
    if before == 0 or before % 2:
        return before, None
    payload = segment[offset + HEADER.size:offset + HEADER.size + min(length, MAX_PAYLOAD)]
    if struct.unpack_from("<Q", segment, offset)[0] != before:
        return before + 1, None  # a write began during the copy
    if length > MAX_PAYLOAD or zlib.crc32(payload) != crc:
        return DAMAGED, None
    return before, payload
