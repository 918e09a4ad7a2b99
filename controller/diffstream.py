"""The export-diff stream: a header, data and zero records, an end record with a
SHA-256 over the whole stream (docs/export-diff.md has the format byte by byte).

Modelled on rbd's export-diff format ("rbd diff v1": tagged records, 'w' for
data, 'z' for zero, 'e' for the end), with a checksum added so a damaged or
truncated stream is refused before anything is applied. The writer and the
reader work on binary file objects and do nothing else: no controller, no
disk.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple, Protocol

MAGIC = b"virtfs diff\n"
VERSION = 1
MAX_DATA = 4 << 20  # the longest data record (bytes)
MAX_SNAP_NAME = 255  # bytes of UTF-8, as protocol.MAX_NAME_BYTES
TAG_DATA, TAG_ZERO, TAG_END = b"w", b"z", b"e"
_HEAD = struct.Struct(">HQ")  # version, disk size
_NAME = struct.Struct(">H")  # a name's length
_DATA = struct.Struct(">QI")  # offset, length
_ZERO = struct.Struct(">QQ")  # offset, length
_END = struct.Struct(">Q")  # records before the end record
DIGEST = 32  # SHA-256


class Readable(Protocol):
    """What the reader needs of its source: read(n) -> at most n bytes (b"" at the end)."""

    def read(self, n: int, /) -> bytes: ...


class StreamError(ValueError):
    """A stream that is not one, or is damaged or truncated (the message says how)."""


class Header(NamedTuple):
    """size: the disk's size at TO (bytes); from_snap: the snapshot the stream starts
    from ("" for a full stream); to_snap: the snapshot it brings the disk to."""

    size: int
    from_snap: str
    to_snap: str


class Record(NamedTuple):
    """A data record (data: its bytes) or a zero record (data None)."""

    offset: int
    length: int
    data: bytes | None

    @property
    def end(self) -> int:
        return self.offset + self.length


def _name(n: str, what: str) -> bytes:
    raw = n.encode("utf-8")
    if len(raw) > MAX_SNAP_NAME:
        raise ValueError(f"{what} is longer than {MAX_SNAP_NAME} bytes")
    return _NAME.pack(len(raw)) + raw


class StreamWriter:
    """Writes a stream to out (a binary file object): the header at once, then data
    and zero records in offset order, then end(). Raises ValueError for records out
    of order or outside the disk (a bug of the caller, not of the stream)."""

    def __init__(self, out: BinaryIO, header: Header):
        self.out = out
        self.header = header
        self._hash = hashlib.sha256()
        self.records = 0
        self.pos = 0  # the end of the last record
        self.bytes = 0  # written so far
        self.data_bytes = self.zero_bytes = 0  # what the data and zero records cover
        self._put(MAGIC + _HEAD.pack(VERSION, header.size)
                  + _name(header.from_snap, "FROM") + _name(header.to_snap, "TO"))

    def _put(self, b: bytes) -> None:
        self._hash.update(b)
        self.out.write(b)
        self.bytes += len(b)

    def _check(self, offset: int, length: int) -> None:
        if offset < self.pos or length <= 0 or offset + length > self.header.size:
            raise ValueError(f"record {offset}+{length} is out of order or outside the disk")
        self.pos = offset + length
        self.records += 1

    def data(self, offset: int, data: bytes) -> None:
        """A data record (at most MAX_DATA bytes)."""
        if len(data) > MAX_DATA:
            raise ValueError(f"data record of {len(data)} bytes (at most {MAX_DATA})")
        self._check(offset, len(data))
        self.data_bytes += len(data)
        self._put(TAG_DATA + _DATA.pack(offset, len(data)))
        self._put(data)

    def zero(self, offset: int, length: int) -> None:
        """A zero record: [offset, offset + length) reads zeros at TO."""
        self._check(offset, length)
        self.zero_bytes += length
        self._put(TAG_ZERO + _ZERO.pack(offset, length))

    def end(self) -> str:
        """The end record; the stream's SHA-256 (hex)."""
        self._put(TAG_END + _END.pack(self.records))
        digest = self._hash.digest()
        self.out.write(digest)
        self.bytes += len(digest)
        return digest.hex()


class StreamReader:
    """Reads a stream from src (a binary file object), checking it as it goes: header()
    first, then records(); StreamError at the first thing wrong. records() ends only
    after the end record's checksum matched and nothing follows it, so a consumer that
    must not act on a damaged stream reads it through once first (verify)."""

    def __init__(self, src: Readable):
        self.src = src
        self._hash = hashlib.sha256()
        self.bytes = 0  # read so far
        self.data_bytes = self.zero_bytes = 0  # what the records read so far cover
        self._header: Header | None = None

    def _get(self, n: int, what: str) -> bytes:
        b = self.src.read(n) or b""
        while len(b) < n:
            more = self.src.read(n - len(b))
            if not more:
                raise StreamError(f"truncated: the stream ends inside {what} (at byte "
                                  f"{self.bytes + len(b)})")
            b += more
        self._hash.update(b)
        self.bytes += n
        return b

    def _str(self, what: str) -> str:
        (n,) = _NAME.unpack(self._get(_NAME.size, what))
        if n > MAX_SNAP_NAME:
            raise StreamError(f"damaged header: {what} is {n} bytes long")
        try:
            return self._get(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise StreamError(f"damaged header: {what} is not UTF-8") from None

    def header(self) -> Header:
        """The header; StreamError if the magic or the version is not this format's."""
        if self._header is None:
            magic = self.src.read(len(MAGIC))
            if magic != MAGIC:
                raise StreamError("not a virtfs diff stream (bad magic)")
            self._hash.update(magic)
            self.bytes += len(magic)
            version, size = _HEAD.unpack(self._get(_HEAD.size, "the header"))
            if version != VERSION:
                raise StreamError(f"stream version {version} is not supported (only "
                                  f"{VERSION})")
            self._header = Header(size, self._str("FROM"), self._str("TO"))
            if not self._header.to_snap:
                raise StreamError("damaged header: no TO snapshot name")
        return self._header

    def records(self) -> Iterator[Record]:
        """The records, in order, each checked (order, bounds, lengths); the last
        thing it does is check the end record and the checksum."""
        h = self.header()
        pos = count = 0
        while True:
            where = self.bytes
            tag = self._get(1, "a record's tag")
            if tag == TAG_END:
                (n,) = _END.unpack(self._get(_END.size, "the end record"))
                want = self._hash.digest()
                got = self.src.read(DIGEST) or b""
                if len(got) < DIGEST:
                    raise StreamError("truncated: the stream ends inside the checksum")
                self.bytes += DIGEST
                if got != want:
                    raise StreamError("bad checksum: the stream is damaged")
                if n != count:
                    raise StreamError(f"damaged: {count} records, the end record says {n}")
                if self.src.read(1):
                    raise StreamError("damaged: bytes follow the end record")
                return
            if tag == TAG_DATA:
                offset, length = _DATA.unpack(self._get(_DATA.size, "a data record"))
                if not 0 < length <= MAX_DATA:
                    raise StreamError(f"damaged: data record at byte {where} is {length} "
                                      "bytes long")
            elif tag == TAG_ZERO:
                offset, length = _ZERO.unpack(self._get(_ZERO.size, "a zero record"))
            else:
                raise StreamError(f"damaged: unknown record tag {tag!r} at byte {where}")
            if offset < pos or length <= 0 or offset + length > h.size:
                raise StreamError(f"damaged: record {offset}+{length} at byte {where} is out "
                                  f"of order or past the disk's end ({h.size})")
            pos = offset + length
            count += 1
            data = self._get(length, "a data record") if tag == TAG_DATA else None
            if data is None:
                self.zero_bytes += length
            else:
                self.data_bytes += length
            yield Record(offset, length, data)

    def verify(self) -> tuple[Header, int]:
        """Read the whole stream, checking it: (header, records). StreamError if it is
        damaged anywhere."""
        h = self.header()
        n = sum(1 for _ in self.records())
        return h, n


def copy_verified(src: BinaryIO, dst: BinaryIO) -> tuple[Header, int]:
    """Copy a stream from src (a pipe) to dst (a file) while checking it; (header,
    records). StreamError if it is damaged (dst then holds what came before)."""
    return tee_reader(src, dst).verify()


def tee_reader(src: BinaryIO, dst: BinaryIO) -> StreamReader:
    """A StreamReader of src that copies what it reads to dst (copy_verified's)."""

    class Tee:
        def read(self, n: int, /) -> bytes:
            b = src.read(n)
            if b:
                dst.write(b)
            return b

    return StreamReader(Tee())


__all__ = ["MAGIC", "MAX_DATA", "VERSION", "Header", "Record", "StreamError", "StreamReader",
           "StreamWriter", "copy_verified", "tee_reader"]
