"""The one msgpack wrapper: used by the wire protocol and the journal alike.

The wire's framing is here; the journal's and the checkpoint's (magic, length,
CRC) is in ``frames``, over ``pack`` and ``unpack``.

Everything that crosses a trust boundary (a socket, a file that may be damaged)
is decoded here, with explicit limits: no ext types, no timestamps, string map
keys only, and a size cap checked before a byte of payload is read.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

# Wire frames: 4-byte big-endian length, then the msgpack payload.
WIRE_HEADER = struct.Struct(">I")

MAX_REQUEST_FRAME = 1 << 20  # what a server accepts from a client
MAX_RESPONSE_FRAME = 256 << 20  # what a client accepts from the server


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
