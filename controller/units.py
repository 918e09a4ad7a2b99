"""Sizes as people write them: plain bytes or binary suffixes (pure)."""

from __future__ import annotations

import re

_SUFFIX = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE_RE = re.compile(r"(\d+)(?:\.(\d+))?\s*([KMGTPE]?)(?:i?B)?", re.IGNORECASE)


SIZE_HELP = ("bytes, or a number (decimals allowed) with K, M, G, T, P or E, powers of 1024; "
             "a trailing B or iB changes nothing: 4096, 10G, 1.5T, 512KiB")


def human(n: int) -> str:
    """Bytes as errors and notices show them: '4.0M (4194304 bytes)', exact below 1 KiB."""
    return f"{format_size(n)} ({n} bytes)" if n >= 1024 else f"{n} bytes"


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


def format_size(n: int) -> str:
    """Bytes -> a short human form with a binary suffix (exact bytes below 1 KiB)."""
    if n < 1024:
        return f"{n}B"
    for suffix, shift in (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f}{suffix}" if v == int(v) else f"{v:.1f}{suffix}"
    return f"{n}B"


def seconds_arg(text: str) -> float:
    """An argparse type for a duration in seconds ('30', '2.5'): a finite number > 0.

    Raises argparse.ArgumentTypeError (one line, the value named) otherwise.
    """
    import argparse
    import math
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: seconds, "
                                         "a number such as 30 or 2.5") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be more than 0 s")
    return v
