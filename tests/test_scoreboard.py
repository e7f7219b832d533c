"""The scoreboard: a worker's counters in shared memory, readable by the master after the
worker died, never torn: across fork, across a writer killed mid-write, under a racing
writer in another process."""

from __future__ import annotations

import os
import signal
import struct
import time
from typing import Iterator

import msgpack
import pytest

from meteorit.scoreboard import BUFFER_SIZE, MAX_PAYLOAD, Scoreboard


@pytest.fixture
def board() -> Iterator[Scoreboard]:
    b = Scoreboard(3)
    yield b
    b.close()


def test_a_write_is_read_back_and_the_latest_wins(board: Scoreboard) -> None:
    assert board.read(0) is None  # nothing written yet
    for n in range(5):
        assert board.write(0, msgpack.packb({"n": n}))
        assert msgpack.unpackb(board.read(0)) == {"n": n}
    assert board.read(1) is None  # slots are separate


def test_a_childs_writes_survive_its_sigkill(board: Scoreboard) -> None:
    """Made before fork, MAP_SHARED: what the child wrote is the parent's to read after
    the child is gone, and the child could not see the other slots."""
    pid = os.fork()
    if pid == 0:  # the child: like a worker, it keeps only its slot and writes
        board.keep_only(1)
        board.write(1, b"counted 42")
        try:
            board.write(0, b"not mine")
            os._exit(3)
        except KeyError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert board.read(1) == b"counted 42"
    assert board.read(0) is None


def test_a_write_cut_short_leaves_the_previous_snapshot(board: Scoreboard) -> None:
    board.write(0, b"first")
    board.write(0, b"second")
    # a writer killed in the middle of its next write: that buffer's sequence stays odd
    # and part of the payload is new
    segment = board._maps[0]
    offset = 0 if struct.unpack_from("<Q", segment, 0)[0] < struct.unpack_from("<Q", segment, BUFFER_SIZE)[0] \
        else BUFFER_SIZE
    sequence = max(struct.unpack_from("<Q", segment, o)[0] for o in (0, BUFFER_SIZE)) + 1
    struct.pack_into("<Q", segment, offset, sequence)
    segment[offset + 16:offset + 21] = b"third"
    assert board.read(0) == b"second"


def test_a_damaged_payload_is_refused_by_its_checksum(board: Scoreboard) -> None:
    board.write(0, b"first")
    board.write(0, b"second")
    segment = board._maps[0]
    newest = max((0, BUFFER_SIZE), key=lambda o: struct.unpack_from("<Q", segment, o)[0])
    segment[newest + 16] ^= 0xFF
    assert board.read(0) == b"first"


def test_clear_forgets_and_the_next_writer_starts_again(board: Scoreboard) -> None:
    board.write(2, b"old worker")
    board.clear(2)
    assert board.read(2) is None
    board.write(2, b"new worker")
    assert board.read(2) == b"new worker"


def test_a_snapshot_too_large_is_refused_and_the_previous_stays(board: Scoreboard) -> None:
    board.write(0, b"fits")
    assert not board.write(0, b"x" * (MAX_PAYLOAD + 1))
    assert board.read(0) == b"fits"
    assert board.write(0, b"y" * MAX_PAYLOAD) and board.read(0) == b"y" * MAX_PAYLOAD


def test_a_reader_racing_a_writer_in_another_process_never_sees_a_torn_snapshot(board: Scoreboard) -> None:
    """A child writes as fast as it can, snapshots of varying size whose every byte tells
    which write it was; the parent reads meanwhile: each read is whole and never older
    than the one before."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        n = 0
        while True:
            n += 1
            board.write(0, struct.pack("<Q", n) * (1 + n % 500))
            if n == 1:
                os.write(ready_w, b"1")
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        last = 0
        reads = 0
        deadline = time.monotonic() + 60
        while reads < 20000:
            assert time.monotonic() < deadline, f"only {reads} whole reads in 60s"
            payload = board.read(0)
            if payload is None:
                continue  # three racing tries in a row: allowed, and rare
            reads += 1
            values = set(struct.unpack(f"<{len(payload) // 8}Q", payload))
            assert len(values) == 1, "a torn snapshot"
            (n,) = values
            assert len(payload) == 8 * (1 + n % 500)
            assert n >= last
            last = n
        assert last > 1  # the writer did run meanwhile
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
