"""The one msgpack wrapper: used by the wire protocol and the journal alike.

Everything that crosses a trust boundary (a socket, a file that may be damaged)
is decoded here, with explicit limits: no ext types, no timestamps, string map
keys only, and a size cap checked before a byte of payload is read.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack

# Wire frames: 4-byte big-endian length, then the msgpack payload.
WIRE_HEADER = struct.Struct(">I")
# Journal frames: magic, payload length, CRC32 over (length bytes + payload).
JOURNAL_MAGIC = b"VJ01"
JOURNAL_HEADER = struct.Struct(">4sII")

MAX_REQUEST_FRAME = 1 << 20  # what a server accepts from a client
MAX_RESPONSE_FRAME = 256 << 20  # what a client accepts from the server
MAX_JOURNAL_RECORD = 64 << 20


class CodecError(ValueError):
    """A frame that cannot be decoded: malformed, oversized or damaged."""


def _reject_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack ext type {code} is not allowed")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=False)


def unpack(data: bytes | memoryview, *, max_size: int = MAX_REQUEST_FRAME) -> Any:
    if len(data) > max_size:
        raise CodecError(f"frame of {len(data)} bytes exceeds the {max_size}-byte cap")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            timestamp=0,
            use_list=True,
        )
    except CodecError:
        raise
    except Exception as e:  # msgpack raises several unrelated types
        raise CodecError(f"malformed msgpack: {e.__class__.__name__}: {e}") from None


def wire_frame(obj: Any) -> bytes:
    payload = pack(obj)
    return WIRE_HEADER.pack(len(payload)) + payload


def wire_length(header: bytes, *, max_size: int) -> int:
    (length,) = WIRE_HEADER.unpack(header)
    if length > max_size:
        raise CodecError(f"frame length {length} exceeds the {max_size}-byte cap")
    return length


def journal_crc(length: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack(">I", length)))


def journal_frame(obj: Any) -> bytes:
    """obj packed and framed for the journal or a checkpoint: header + msgpack payload.

    Raises CodecError if obj cannot be packed (a type msgpack does not know, an
    integer out of range) or packs to more than MAX_JOURNAL_RECORD bytes.
    """
    try:
        payload = pack(obj)
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"journal record cannot be packed: {e.__class__.__name__}: {e}") from None
    if len(payload) > MAX_JOURNAL_RECORD:
        raise CodecError(f"journal record of {len(payload)} bytes is too large "
                         f"(at most {MAX_JOURNAL_RECORD})")
    return JOURNAL_HEADER.pack(JOURNAL_MAGIC, len(payload), journal_crc(len(payload), payload)) + (
        payload
    )


def parse_journal_frame(buf: bytes | memoryview, pos: int) -> tuple[Any, int] | None:
    """Decode the journal frame at buf[pos:]; (record, end) or None if not a valid frame."""
    hsize = JOURNAL_HEADER.size
    if len(buf) - pos < hsize:
        return None
    magic, length, crc = JOURNAL_HEADER.unpack_from(buf, pos)
    if magic != JOURNAL_MAGIC or length > MAX_JOURNAL_RECORD:
        return None
    end = pos + hsize + length
    if end > len(buf):
        return None
    payload = memoryview(buf)[pos + hsize : end]  # no copy
    if journal_crc(length, payload) != crc:
        return None
    try:
        return unpack(payload, max_size=MAX_JOURNAL_RECORD), end
    except CodecError:
        return None
