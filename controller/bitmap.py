"""Block bitmaps: one bit per 4 KiB block of a segment (pure).

A set bit means that block's current data is at the segment's alternate
location. Bits past ``nblocks`` are always clear, so two bitmaps compare equal
exactly when they mark the same blocks.
"""

from __future__ import annotations


class Bitmap:
    __slots__ = ("nblocks", "_bits")

    def __init__(self, nblocks: int, data: bytes | None = None):
        if nblocks < 0:
            raise ValueError("negative bitmap size")
        self.nblocks = nblocks
        nbytes = (nblocks + 7) // 8
        if data is None:
            self._bits = bytearray(nbytes)
        else:
            if len(data) != nbytes:
                raise ValueError(
                    f"bitmap of {nblocks} blocks needs {nbytes} bytes, got {len(data)}")
            self._bits = bytearray(data)
            if nblocks % 8 and self._bits[-1] >> (nblocks % 8):
                raise ValueError("bitmap has bits set past its end")

    def _check(self, block: int) -> None:
        if not 0 <= block < self.nblocks:
            raise IndexError(f"block {block} outside bitmap of {self.nblocks}")

    def test(self, block: int) -> bool:
        self._check(block)
        return bool(self._bits[block >> 3] & (1 << (block & 7)))

    def set_range(self, start: int, count: int) -> int:
        """Set blocks [start, start+count); return how many were newly set."""
        if count > 0:  # check both ends first: a bad range must change nothing
            self._check(start)
            self._check(start + count - 1)
        newly = 0
        for b in range(start, start + count):
            mask = 1 << (b & 7)
            if not self._bits[b >> 3] & mask:
                self._bits[b >> 3] |= mask
                newly += 1
        return newly

    def count(self) -> int:
        return sum(bin(x).count("1") for x in self._bits)

    def all_set(self) -> bool:
        return self.count() == self.nblocks

    def first_clear(self, start: int = 0) -> int | None:
        for b in range(start, self.nblocks):
            if not self._bits[b >> 3] & (1 << (b & 7)):
                return b
        return None

    def slice(self, start: int, count: int) -> Bitmap:
        out = Bitmap(count)
        for i in range(count):
            if self.test(start + i):
                out._bits[i >> 3] |= 1 << (i & 7)
        return out

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and (self.nblocks, self._bits) == (
            other.nblocks,
            other._bits,
        )

    def __repr__(self) -> str:
        return f"Bitmap({self.nblocks}, set={self.count()})"
