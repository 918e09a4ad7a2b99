"""Sizes as people write them: plain bytes or binary suffixes (pure)."""

from __future__ import annotations

import argparse
import math
import re

_SUFFIX = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE_RE = re.compile(r"(\d+)(?:\.(\d+))?\s*([KMGTPE]?)(?:i?B)?", re.IGNORECASE)


SIZE_HELP = ("bytes, or a number (decimals allowed) with K, M, G, T, P or E, powers of 1024; "
             "a trailing B or iB changes nothing: 4096, 10G, 1.5T, 512KiB")


class SizeError(ValueError):
    pass


def parse_size(text: str) -> int:
    """'4096', '10G', '1.5G', '512KiB' -> bytes (K, M, G, T, P, E are powers of 1024).

    A fractional size must come out as a whole number of bytes.
    """
    if not isinstance(text, str):
        raise SizeError(f"invalid size {text!r}")
    m = _SIZE_RE.fullmatch(text.strip())
    if not m or not text.strip():
        raise SizeError(
            f"invalid size {text!r}: {SIZE_HELP}"
        )
    whole, frac, suffix = m.group(1), m.group(2) or "", m.group(3).upper()
    shift = _SUFFIX[suffix]
    num = int(whole + frac) << shift
    den = 10 ** len(frac)
    if num % den:
        raise SizeError(f"invalid size {text!r}: not a whole number of bytes")
    return num // den


_UNITS = (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10))


def _decimal(num: int, den: int, places: int) -> str | None:
    """num/den written with at most places decimals, trailing zeros dropped, if that
    is exact; else None."""
    scaled, rem = divmod(num * 10 ** places, den)
    if rem:
        return None
    whole, frac = divmod(scaled, 10 ** places)
    digits = f"{frac:0{places}d}".rstrip("0") if places else ""
    return f"{whole}.{digits}" if digits else str(whole)


def format_size(n: int, exact: bool = False) -> str:
    """Bytes (int >= 0) -> the short form every vdctl table and message uses.

    Binary suffixes (K = 1024 bytes, ..., E = 2**60), at most two decimals, never a
    misleading ".0": 0 -> "0B", 1023 -> "1023B", 300 MiB -> "300M", 1.5 GiB ->
    "1.5G". A value those two decimals do not write exactly is marked as rounded
    with "~" ("~300M" for 300 MiB + 4 KiB), unless exact is true: then the largest
    suffix that writes it exactly is used ("307204K"), for figures a reader adds up
    (segment maps). parse_size reads every unmarked result back to n.
    Raises ValueError for a negative n.
    """
    if n < 0:
        raise ValueError(f"negative size {n}")
    for suffix, shift in _UNITS:
        if n >= 1 << shift:
            text = _decimal(n, 1 << shift, 2)
            if text is not None:
                return text + suffix
            if not exact:
                rounded = _decimal(round(n * 10 / (1 << shift)), 10, 1)
                return f"~{rounded}{suffix}"
    return f"{n}B"


def human(n: int, exact: bool = False) -> str:
    """Bytes as errors and notices show them: the short form and the exact count,
    "300M (314572800 bytes)"; below 1 KiB only the count, "512 bytes", "1 byte".
    exact: the short form is never rounded (for limits: "1028K (1052672 bytes)")."""
    if n >= 1024:
        return f"{format_size(n, exact)} ({n} bytes)"
    return "1 byte" if n == 1 else f"{n} bytes"


def format_rate(bytes_per_second: float) -> str:
    """A transfer rate (bytes per second, >= 0) in the same binary units, rounded to
    at most one decimal and said to be a rate: "12.5M/s", "300M/s", "0B/s". Rates
    are measured, so never marked "~"."""
    n = max(0.0, float(bytes_per_second))
    for suffix, shift in _UNITS:
        if n >= 1 << shift:
            v = round(n / (1 << shift), 1)
            return f"{v:g}{suffix}/s" if v < 1e6 else f"{v:.0f}{suffix}/s"
    return f"{round(n):d}B/s"


def size_range(lo: int, hi: int) -> str:
    """The inclusive range [lo, hi] of bytes as range messages name it:
    "between 4K and 1T (4096 to 1099511627776 bytes)"."""
    return (f"between {format_size(lo, True)} and {format_size(hi, True)} "
            f"({lo} to {hi} bytes)")


def seconds_arg(text: str) -> float:
    """An argparse type for a duration in seconds ('30', '2.5'): a finite number > 0.

    Raises argparse.ArgumentTypeError (one line, the value named) otherwise.
    """
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: seconds, "
                                         "a number such as 30 or 2.5") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be more than 0 s")
    return v
