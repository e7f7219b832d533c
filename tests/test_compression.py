"""Content-Encoding: gzip and deflate (zlib and bare) bodies inflate; truncated, corrupt and
trailing data are 400; a body that would inflate past the limit is 413 after inflating no
more than the limit; other encodings are not ours (415 at the app)."""

from __future__ import annotations

import functools
import gzip
import time
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meteorit.errors import EventError
from meteorit.worker.compression import DEFLATE, GZIP, IDENTITY, encoding_of, inflate

BODY = b'[{"type":"pageview","url":"https://shop.example/"},{"type":"click","n":2}]' * 20
LIMIT = 1024 * 1024


@functools.cache
def bomb(mib: int) -> bytes:
    """`mib` MiB of zeros, gzipped: about a thousandth of that, built a MiB at a time."""
    packer = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    return b"".join([packer.compress(zeros) for _ in range(mib)] + [packer.flush()])


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(("header", "encoding"), [
    (b"gzip", GZIP), (b"GZIP", GZIP), (b" x-gzip ", GZIP), (b"deflate", DEFLATE), (b"identity", IDENTITY),
    (b"br", None), (b"zstd", None), (b"gzip, deflate", None), (b"gzip, gzip", None), (b"compress", None),
])
def test_encodings(header: bytes, encoding: str | None) -> None:
    assert encoding_of(header) == encoding


@pytest.mark.parametrize(("encoding", "packed"), [
    (GZIP, gzip.compress(BODY)), (DEFLATE, zlib.compress(BODY)), (DEFLATE, raw_deflate(BODY)),
    (IDENTITY, BODY),
])
def test_a_good_body_inflates_to_what_was_packed(encoding: str, packed: bytes) -> None:
    assert inflate(packed, encoding, LIMIT) == BODY


@given(st.binary(max_size=5000), st.sampled_from([GZIP, DEFLATE]))
def test_any_body_round_trips(data: bytes, encoding: str) -> None:
    packed = gzip.compress(data) if encoding == GZIP else zlib.compress(data)
    assert inflate(packed, encoding, LIMIT) == data


@pytest.mark.parametrize("encoding", [GZIP, DEFLATE])
def test_a_truncated_body_is_400(encoding: str) -> None:
    packed = gzip.compress(BODY) if encoding == GZIP else zlib.compress(BODY)
    for cut in (1, len(packed) // 2, len(packed) - 1):
        with pytest.raises(EventError) as refused:
            inflate(packed[:cut], encoding, LIMIT)
        assert refused.value.status == 400, cut


@pytest.mark.parametrize(("encoding", "packed"), [
    (GZIP, b"\x1f\x8b\x08\x00garbage-garbage-garbage"),
    (GZIP, BODY),  # JSON sent with a gzip label
    (DEFLATE, b"\x78\x9c" + b"\xff" * 40),
    (GZIP, b""),
])
def test_a_corrupt_body_is_400(encoding: str, packed: bytes) -> None:
    with pytest.raises(EventError) as refused:
        inflate(packed, encoding, LIMIT)
    assert refused.value.status == 400


def test_a_gzip_checksum_mismatch_is_400() -> None:
    packed = bytearray(gzip.compress(BODY))
    packed[-5] ^= 0xFF  # the CRC-32 in the trailer
    with pytest.raises(EventError) as refused:
        inflate(bytes(packed), GZIP, LIMIT)
    assert refused.value.status == 400


def test_data_after_the_stream_is_400() -> None:
    with pytest.raises(EventError) as refused:
        inflate(gzip.compress(BODY) + gzip.compress(BODY), GZIP, LIMIT)
    assert refused.value.status == 400 and "after the end" in refused.value.reason


def test_exactly_the_limit_passes_one_byte_more_is_413() -> None:
    assert len(inflate(gzip.compress(b"x" * 1000), GZIP, 1000)) == 1000
    with pytest.raises(EventError) as refused:
        inflate(gzip.compress(b"x" * 1001), GZIP, 1000)
    assert refused.value.status == 413


def test_a_bomb_stops_at_the_limit_without_inflating_the_rest() -> None:
    packed = bomb(128)  # 128 MiB in about 128 KiB
    assert len(packed) < 200 * 1024
    started = time.process_time()
    with pytest.raises(EventError) as refused:
        inflate(packed, GZIP, LIMIT)
    assert refused.value.status == 413
    # inflating all of it takes about half a second of CPU here; one MiB, a few milliseconds
    assert time.process_time() - started < 0.1
