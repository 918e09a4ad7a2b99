"""Block bitmaps: one bit per 4 KiB block of a segment (pure).

A set bit means that block's current data is at the segment's alternate
location (docs/movement.md). Bits past ``nblocks`` are always clear, so two
bitmaps compare equal exactly when they mark the same blocks. Whole bytes are
handled at C speed (slices, ``int.bit_count``), so a 64 MiB segment's 16,384
bits cost microseconds, not a Python loop per bit.
"""

from __future__ import annotations

from collections.abc import Iterator


class Bitmap:
    __slots__ = ("nblocks", "_bits")

    def __init__(self, nblocks: int, data: bytes | None = None):
        """nblocks bits, all clear, or as in data (exactly ceil(nblocks / 8) bytes,
        little-endian within a byte: block b is bit b % 8 of byte b // 8).

        Raises ValueError for a negative size, a wrong length or bits past the end."""
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
        """Set blocks [start, start+count); return how many were newly set.

        Raises IndexError (changing nothing) if the range leaves the bitmap."""
        if count <= 0:
            return 0
        self._check(start)  # check both ends first: a bad range must change nothing
        self._check(start + count - 1)
        before = self.count_range(start, count)
        end = start + count
        b = start
        while b < end and b & 7:
            self._bits[b >> 3] |= 1 << (b & 7)
            b += 1
        whole = (end - b) >> 3
        if whole:
            self._bits[b >> 3 : (b >> 3) + whole] = b"\xff" * whole
            b += whole << 3
        while b < end:
            self._bits[b >> 3] |= 1 << (b & 7)
            b += 1
        return count - before

    def count_range(self, start: int, count: int) -> int:
        """How many of blocks [start, start+count) are set."""
        if count <= 0:
            return 0
        v = int.from_bytes(self._bits[start >> 3 : ((start + count - 1) >> 3) + 1], "little")
        v >>= start & 7
        return (v & ((1 << count) - 1)).bit_count()

    def count(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    def all_set(self) -> bool:
        return self.count() == self.nblocks

    def first_clear(self, start: int = 0) -> int | None:
        for s, _n, value in self.runs(start):
            if not value:
                return s
        return None

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """Maximal runs (first block, count, set?) covering blocks [start, end)."""
        end = self.nblocks if end is None else min(end, self.nblocks)
        b = start
        bits = self._bits
        while b < end:
            value = bool(bits[b >> 3] & (1 << (b & 7)))
            run = b + 1
            while run < end:
                if not run & 7 and run + 8 <= end:
                    byte = bits[run >> 3]
                    if byte == (0xFF if value else 0):
                        # skip whole bytes of the same value at C speed
                        stop = min(end, self.nblocks) >> 3
                        chunk = bytes(bits[run >> 3 : stop])
                        other = chunk.lstrip(b"\xff" if value else b"\x00")
                        run += (len(chunk) - len(other)) << 3
                        continue
                if bool(bits[run >> 3] & (1 << (run & 7))) != value:
                    break
                run += 1
            yield b, min(run, end) - b, value
            b = run

    def slice(self, start: int, count: int) -> Bitmap:
        out = Bitmap(count)
        for s, n, value in self.runs(start, start + count):
            if value:
                out.set_range(s - start, n)
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
