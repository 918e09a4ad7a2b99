"""controller/diffstream.py: the export-diff stream round-trips, and every damage
(truncation anywhere, any byte changed, bad magic or version, records out of order
under a valid checksum) is refused with a StreamError before the records end."""

from __future__ import annotations

import hashlib
import io
import random
import struct

import pytest

from controller import diffstream as S


def make(records: list[tuple[int, bytes | int]], size: int = 1 << 20,
         frm: str = "s1", to: str = "s2") -> bytes:
    out = io.BytesIO()
    w = S.StreamWriter(out, S.Header(size, frm, to))
    for off, x in records:
        if isinstance(x, bytes):
            w.data(off, x)
        else:
            w.zero(off, x)
    digest = w.end()
    raw = out.getvalue()
    assert w.bytes == len(raw) and digest == raw[-32:].hex()
    return raw


def read_all(raw: bytes) -> tuple[S.Header, list[S.Record]]:
    r = S.StreamReader(io.BytesIO(raw))
    return r.header(), list(r.records())


def test_round_trip():
    recs = [(0, b"abc"), (3, 4093), (8192, b"\x01" * 5000), (1 << 19, 1 << 19)]
    raw = make(recs, frm="", to="snap é")
    h, got = read_all(raw)
    assert h == S.Header(1 << 20, "", "snap é")
    assert got == [S.Record(0, 3, b"abc"), S.Record(3, 4093, None),
                   S.Record(8192, 5000, b"\x01" * 5000), S.Record(1 << 19, 1 << 19, None)]
    assert raw.startswith(S.MAGIC)
    assert S.StreamReader(io.BytesIO(raw)).verify() == (h, 4)
    spool = io.BytesIO()
    assert S.copy_verified(io.BytesIO(raw), spool) == (h, 4)
    assert spool.getvalue() == raw
    empty = make([], size=0, frm="a", to="b")
    assert read_all(empty) == (S.Header(0, "a", "b"), [])


def test_writer_refuses_what_the_reader_would():
    w = S.StreamWriter(io.BytesIO(), S.Header(100, "", "t"))
    w.data(10, b"x" * 10)
    for bad in (lambda: w.data(15, b"y"), lambda: w.zero(95, 10), lambda: w.zero(30, 0),
                lambda: w.data(30, b"z" * (S.MAX_DATA + 1))):
        with pytest.raises(ValueError):
            bad()


def test_every_truncation_and_every_changed_byte_is_refused():
    raw = make([(0, b"abcdef"), (4096, 100), (8192, bytes(range(50)))])
    for n in range(len(raw)):
        with pytest.raises(S.StreamError):
            read_all(raw[:n])
    rng = random.Random(1)
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 1 << rng.randrange(8)
        with pytest.raises(S.StreamError):
            read_all(bytes(bad))
    with pytest.raises(S.StreamError, match="bytes follow"):
        read_all(raw + b"\0")


def reseal(body: bytes) -> bytes:
    """body (everything before the digest) with a valid checksum."""
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("body,msg", [
    (b"not a stream at all", "bad magic"),
    (S.MAGIC + struct.pack(">HQ", 2, 10) + b"\0\0\0\1t" + b"e" + bytes(8), "version 2"),
    (S.MAGIC + struct.pack(">HQ", 1, 10) + b"\0\0\0\0" + b"e" + bytes(8), "no TO"),
    (S.MAGIC + struct.pack(">HQ", 1, 10) + b"\0\0\0\1t" + b"q" + bytes(8), "unknown record"),
    (S.MAGIC + struct.pack(">HQ", 1, 10) + b"\0\0\0\1t" + b"z" + struct.pack(">QQ", 5, 5)
     + b"z" + struct.pack(">QQ", 0, 5) + b"e" + struct.pack(">Q", 2), "out of order"),
    (S.MAGIC + struct.pack(">HQ", 1, 10) + b"\0\0\0\1t" + b"z" + struct.pack(">QQ", 5, 6)
     + b"e" + struct.pack(">Q", 1), "past the disk's end"),
    (S.MAGIC + struct.pack(">HQ", 1, 10) + b"\0\0\0\1t" + b"w" + struct.pack(">QI", 0, 0)
     + b"e" + struct.pack(">Q", 1), "0 bytes long"),
    (S.MAGIC + struct.pack(">HQ", 1, 10) + b"\0\0\0\1t" + b"e" + struct.pack(">Q", 3),
     "end record says 3"),
])
def test_malformed_streams_with_valid_checksums(body, msg):
    with pytest.raises(S.StreamError, match=msg):
        read_all(reseal(body))
