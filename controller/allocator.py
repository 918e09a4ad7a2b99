"""Free-space accounting per container and the placement policy (pure).

Each container's free space is a sorted list of disjoint, non-adjacent free
ranges. Planning (``plan_*``) never changes anything: the service plans, writes
the plan into a journal record, and ``State.apply`` calls ``take``/``release``,
so replay makes exactly the same choices as the live run.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterator

from .protocol import BLOCK_SIZE
from .units import human


class AllocError(ValueError):
    """take/release of a range that is not in the expected state: corruption."""


class NoSpace(Exception):
    """Not enough free space for the request."""


class FreeSpace:
    __slots__ = ("size", "_starts", "_lens", "_free", "cursor")

    def __init__(self, size: int, *, empty: bool = True):
        self.size = size
        self._starts = array("q")
        self._lens = array("q")
        self._free = 0
        # next-fit cursor: thin segments allocated one after another land
        # contiguously, so their extents merge.
        self.cursor = 0
        usable = size - size % BLOCK_SIZE
        if empty and usable > 0:
            self._starts.append(0)
            self._lens.append(usable)
            self._free = usable

    @property
    def free(self) -> int:
        return self._free

    def ranges(self) -> Iterator[tuple[int, int]]:
        yield from zip(self._starts, self._lens, strict=True)

    def __len__(self) -> int:
        return len(self._starts)

    def is_free(self, offset: int, length: int) -> bool:
        i = bisect_right(self._starts, offset) - 1
        return i >= 0 and offset + length <= self._starts[i] + self._lens[i]

    def is_used(self, offset: int, length: int) -> bool:
        """No byte of [offset, offset + length) is free (all of it is allocated)."""
        i = bisect_right(self._starts, offset) - 1
        if i >= 0 and self._starts[i] + self._lens[i] > offset:
            return False
        return not (i + 1 < len(self._starts) and self._starts[i + 1] < offset + length)

    def take(self, offset: int, length: int) -> None:
        if length <= 0:
            raise AllocError(f"bad length {length}")
        i = bisect_right(self._starts, offset) - 1
        if i < 0 or offset + length > self._starts[i] + self._lens[i]:
            raise AllocError(f"range {offset}+{length} is not free")
        s, n = self._starts[i], self._lens[i]
        head, tail = offset - s, s + n - (offset + length)
        if head:
            self._lens[i] = head
            if tail:
                self._starts.insert(i + 1, offset + length)
                self._lens.insert(i + 1, tail)
        elif tail:
            self._starts[i] = offset + length
            self._lens[i] = tail
        else:
            del self._starts[i]
            del self._lens[i]
        self._free -= length
        self.cursor = offset + length

    def release(self, offset: int, length: int) -> None:
        # the partial block at the end is never free, so it can never be released
        if length <= 0 or offset < 0 or offset + length > self.size - self.size % BLOCK_SIZE:
            raise AllocError(f"bad range {offset}+{length}")
        i = bisect_right(self._starts, offset)  # first free range after offset
        if i > 0 and self._starts[i - 1] + self._lens[i - 1] > offset:
            raise AllocError(f"range {offset}+{length} is already free")
        if i < len(self._starts) and self._starts[i] < offset + length:
            raise AllocError(f"range {offset}+{length} is already partly free")
        merge_left = i > 0 and self._starts[i - 1] + self._lens[i - 1] == offset
        merge_right = i < len(self._starts) and self._starts[i] == offset + length
        if merge_left and merge_right:
            self._lens[i - 1] += length + self._lens[i]
            del self._starts[i]
            del self._lens[i]
        elif merge_left:
            self._lens[i - 1] += length
        elif merge_right:
            self._starts[i] = offset
            self._lens[i] += length
        else:
            self._starts.insert(i, offset)
            self._lens.insert(i, length)
        self._free += length

    def release_many(self, ranges: list[tuple[int, int]]) -> None:
        """release(offset, length) of each of ranges, in one merge with the free list:
        O(n log n + free ranges), not an array insert each (a snapshot of 262,144
        extents removed). Raises AllocError, and changes nothing, if a range is bad,
        already (partly) free, or overlaps another of ranges."""
        limit = self.size - self.size % BLOCK_SIZE
        new = sorted(ranges)
        starts, lens = self._starts, self._lens
        out_s, out_l = array("q"), array("q")
        i = j = total = 0
        m, k = len(starts), len(new)
        while i < m or j < k:
            if j >= k or (i < m and starts[i] < new[j][0]):
                off, n = starts[i], lens[i]
                i += 1
            else:
                off, n = new[j]
                j += 1
                if n <= 0 or off < 0 or off + n > limit:
                    raise AllocError(f"bad range {off}+{n}")
                total += n
            if out_s:
                end = out_s[-1] + out_l[-1]
                if end > off:
                    raise AllocError(f"range {off}+{n} is already (partly) free")
                if end == off:
                    out_l[-1] += n
                    continue
            out_s.append(off)
            out_l.append(n)
        self._starts, self._lens = out_s, out_l
        self._free += total

    def find_contiguous(self, length: int) -> int | None:
        """Next fit: from the cursor to the end, then from the start."""
        starts, lens = self._starts, self._lens
        n = len(starts)
        i = bisect_right(starts, self.cursor) - 1
        if i >= 0 and self.cursor + length <= starts[i] + lens[i]:
            return self.cursor
        for j in (*range(i + 1, n), *range(0, min(i + 1, n))):
            if lens[j] >= length:
                return starts[j]
        return None

    def plan(self, length: int) -> list[tuple[int, int]]:
        """Pieces (offset, length) totalling length, biggest ranges first; NoSpace if short."""
        if length > self._free:
            raise NoSpace(f"need {human(length)}, {human(self._free)} free")
        where = self.find_contiguous(length)
        if where is not None:
            return [(where, length)]
        order = sorted(range(len(self._starts)), key=lambda i: -self._lens[i])
        out: list[tuple[int, int]] = []
        need = length
        for i in order:
            take = min(need, self._lens[i])
            out.append((self._starts[i], take))
            need -= take
            if not need:
                break
        return sorted(out)

    def without(self, ranges: list[tuple[int, int]]) -> FreeSpace:
        """A copy with ranges [(offset, length)] (each wholly free here) taken out.

        For planning around space that is reserved but not yet recorded; this object is
        not changed. Costs a copy of the free list (two arrays).
        """
        fs = FreeSpace(self.size, empty=False)
        fs._starts = array("q", self._starts)
        fs._lens = array("q", self._lens)
        fs._free = self._free
        fs.cursor = self.cursor
        for offset, length in ranges:
            fs.take(offset, length)
        return fs

    def to_wire(self) -> list[bytes]:
        return [self._starts.tobytes(), self._lens.tobytes()]

    @classmethod
    def from_wire(cls, size: int, cols: list[bytes], cursor: int = 0) -> FreeSpace:
        fs = cls(size, empty=False)
        fs._starts.frombytes(cols[0])
        fs._lens.frombytes(cols[1])
        if len(fs._starts) != len(fs._lens):
            raise AllocError("free list columns differ in length")
        prev_end = -1
        for s, n in fs.ranges():
            if n <= 0 or s <= prev_end or s + n > size:
                raise AllocError(f"free list range {s}+{n} overlaps, touches or is out of range")
            prev_end = s + n
            fs._free += n
        fs.cursor = cursor
        return fs
