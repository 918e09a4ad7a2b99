"""The frame format of the journal and the checkpoint, and reading frames back.

A frame is a 12-byte header (magic ``VJ01``, payload length, CRC32 over the four
length bytes and the payload, all big-endian) and a msgpack payload of at most
``MAX_JOURNAL_RECORD`` bytes, packed and unpacked by ``codec`` (the one msgpack
wrapper, with its limits). A journal record and a checkpoint part are one frame each.

Files are read as a stream: ``FrameReader`` reads in chunks of ``READ_CHUNK`` bytes
and holds at most one chunk plus one frame, so a journal or a checkpoint of any
size is read in memory bounded by its largest frame. ``find_frame_after`` looks
past damage for the next valid frame the same way.

No trio here: the callers run these in a worker thread or before the loop starts.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from . import codec

MAGIC = b"VJ01"
HEADER = struct.Struct(">4sII")  # magic, payload length, CRC32
# Largest payload (bytes). Read at call time, so tests may lower it.
MAX_JOURNAL_RECORD = 64 << 20
# bytes asked of the file per read while streaming
READ_CHUNK = 1 << 20

# why FrameReader stopped before the end of a file (Fault.kind)
TRUNCATED = "truncated"  # the file ends inside a frame
BAD_HEADER = "bad frame header"  # wrong magic, or a length past the cap
BAD_CRC = "CRC mismatch"
BAD_PAYLOAD = "malformed payload"  # the CRC matches, msgpack refuses it (Fault.detail)


class JournalCorrupt(Exception):
    """The persistent state is damaged in a way recovery must not paper over."""


@dataclass(frozen=True)
class Fault:
    """Where and why a stream of frames stopped before the end of its file.

    offset: byte offset of the frame that is not valid; kind: TRUNCATED, BAD_HEADER,
    BAD_CRC or BAD_PAYLOAD; detail: codec's message for BAD_PAYLOAD.
    """

    offset: int
    kind: str
    detail: str = ""


def crc(length: int, payload: bytes | memoryview) -> int:
    """The CRC32 a frame's header carries: over the 4 big-endian length bytes, then
    the payload."""
    return zlib.crc32(payload, zlib.crc32(struct.pack(">I", length)))


def encode(obj: object) -> bytes:
    """obj packed and framed for the journal or a checkpoint: header + msgpack payload.

    Raises CodecError if obj cannot be packed (a type msgpack does not know, an
    integer out of range) or packs to more than MAX_JOURNAL_RECORD bytes.
    """
    try:
        payload = codec.pack(obj)
    except (TypeError, ValueError, OverflowError) as e:
        raise codec.CodecError(
            f"journal record cannot be packed: {e.__class__.__name__}: {e}") from None
    if len(payload) > MAX_JOURNAL_RECORD:
        raise codec.CodecError(f"journal record of {len(payload)} bytes is too large "
                               f"(at most {MAX_JOURNAL_RECORD})")
    return HEADER.pack(MAGIC, len(payload), crc(len(payload), payload)) + payload


def _payload(buf: bytes | memoryview, start: int, end: int, length: int,
             want_crc: int) -> object:
    """The decoded payload buf[start:end], or a Fault (offset 0: the caller's to set)."""
    payload = memoryview(buf)[start:end]  # no copy
    if crc(length, payload) != want_crc:
        return Fault(0, BAD_CRC)
    try:
        return codec.unpack(payload, max_size=MAX_JOURNAL_RECORD)
    except codec.CodecError as e:
        return Fault(0, BAD_PAYLOAD, str(e))


def parse(buf: bytes | memoryview, pos: int) -> tuple[object, int] | None:
    """Decode the frame at buf[pos:]; (object, end offset) or None if there is no
    complete valid frame there."""
    hsize = HEADER.size
    if len(buf) - pos < hsize:
        return None
    magic, length, want = HEADER.unpack_from(buf, pos)
    if magic != MAGIC or length > MAX_JOURNAL_RECORD:
        return None
    end = pos + hsize + length
    if end > len(buf):
        return None
    obj = _payload(buf, pos + hsize, end, length, want)
    return None if isinstance(obj, Fault) else (obj, end)


class FrameReader:
    """The frames of a file, decoded one at a time from its current position.

    Iterating yields each frame's object and stops at the end of the file or at the
    first frame that is not valid. Afterwards ``end`` is the byte offset just past
    the last frame yielded (relative to where reading started) and ``fault`` says
    why reading stopped early (None: the file ended cleanly at a frame boundary).
    Reads READ_CHUNK bytes at a time; memory is bounded by one chunk plus the
    largest frame. Raises OSError as f.read does.
    """

    def __init__(self, f: IO[bytes], *, chunk: int = READ_CHUNK):
        self._f = f
        self._chunk = chunk
        self.end = 0
        self.fault: Fault | None = None

    def _fill(self, buf: bytes, i: int, need: int) -> bytes:
        """buf[i:] followed by more of the file, until it holds need bytes or the
        file ends."""
        parts = [buf[i:]]
        have = len(buf) - i
        while have < need:
            more = self._f.read(max(self._chunk, need - have))
            if not more:
                break
            parts.append(more)
            have += len(more)
        return b"".join(parts)

    def __iter__(self) -> Iterator[object]:
        hsize = HEADER.size
        unpack_header = HEADER.unpack_from
        buf = b""
        i = 0  # where the next frame starts in buf
        base = 0  # the offset of buf[0] from where reading started
        while True:
            if len(buf) - i < hsize:
                base += i
                buf, i = self._fill(buf, i, hsize), 0
                if len(buf) < hsize:
                    if buf:
                        self.fault = Fault(base, TRUNCATED)
                    return
            magic, length, want = unpack_header(buf, i)
            if magic != MAGIC or length > MAX_JOURNAL_RECORD:
                self.fault = Fault(base + i, BAD_HEADER)
                return
            end = i + hsize + length
            if end > len(buf):
                base += i
                buf, i = self._fill(buf, i, hsize + length), 0
                end = hsize + length
                if end > len(buf):
                    self.fault = Fault(base, TRUNCATED)
                    return
            obj = _payload(buf, i + hsize, end, length, want)
            if isinstance(obj, Fault):
                self.fault = Fault(base + i, obj.kind, obj.detail)
                return
            i = end
            self.end = base + i
            yield obj


def _valid_at(f: IO[bytes], pos: int) -> bool:
    """Whether a complete valid frame starts at byte pos of f (moves f's position)."""
    f.seek(pos)
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return False
    magic, length, want = HEADER.unpack(head)
    if magic != MAGIC or length > MAX_JOURNAL_RECORD:
        return False
    payload = f.read(length)
    return len(payload) == length and not isinstance(
        _payload(payload, 0, length, length, want), Fault)


def find_frame_after(f: IO[bytes], pos: int, *, chunk: int = READ_CHUNK) -> int | None:
    """The offset of the first valid frame of f that starts after byte pos, or None.

    Streams f from pos in chunks (memory: one chunk plus one frame). Moves f's
    position; raises OSError as f.read does.
    """
    start = pos + 1
    overlap = len(MAGIC) - 1  # a magic cut by the end of a chunk is found in the next
    while True:
        f.seek(start)
        block = f.read(chunk)
        q = block.find(MAGIC)
        while q != -1:
            if _valid_at(f, start + q):
                return start + q
            q = block.find(MAGIC, q + 1)
        if len(block) < chunk:
            return None
        start += max(1, len(block) - overlap)
