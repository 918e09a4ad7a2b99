"""controller/units.py (sizes), controller/protocol.py (names, argument schemas),
controller/codec.py (wire frames), controller/frames.py (journal frames)."""

from __future__ import annotations

import re
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller import codec, frames
from controller import protocol as P
from controller.units import SizeError, format_rate, format_size, human, parse_size, size_range

# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("0", 0), ("12345", 12345), ("1K", 1024), ("10G", 10 << 30),
    ("1.5G", 3 << 29), ("0.5K", 512), ("2T", 2 << 40), ("512KiB", 512 << 10),
    ("4m", 4 << 20), (" 4096 ", 4096), ("1.25K", 1280), ("3B", 3),
])
def test_parse_size_accepts(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "-1", "10Q", "1.5.G", "", "   ", "1.5", "0.3K", "G", ".5G", "1.G", "1e3", "+5", "0x10",
    "1 2", "10GG", "1,5G",
])
def test_parse_size_rejects(text):
    with pytest.raises(SizeError):
        parse_size(text)


def test_parse_size_rejects_non_strings():
    for bad in (None, 5, b"5"):
        with pytest.raises(SizeError):
            parse_size(bad)  # type: ignore[arg-type]


@given(st.integers(0, 1 << 62))
def test_parse_size_plain_bytes_roundtrip(n):
    assert parse_size(str(n)) == n


@given(st.integers(0, 1 << 20), st.sampled_from("KMGT"))
def test_parse_size_suffixes(n, suffix):
    shift = {"K": 10, "M": 20, "G": 30, "T": 40}[suffix]
    assert parse_size(f"{n}{suffix}") == n << shift


def test_format_size():
    assert format_size(0) == "0B"
    assert format_size(1023) == "1023B"
    assert format_size(1024) == "1K"
    assert format_size(3 << 29) == "1.5G"
    assert format_size(10 << 40) == "10T"
    assert format_size(300 << 20) == "300M"  # never "300.0M"
    assert format_size(1280) == "1.25K"
    assert format_size((300 << 20) + 4096) == "~300M"  # rounded, and says so
    assert format_size((300 << 20) + 4096, exact=True) == "307204K"
    assert format_size(12345) == "~12.1K"
    assert format_size(1 << 60) == "1E"
    with pytest.raises(ValueError):
        format_size(-1)


@given(st.integers(0, 1 << 62))
def test_format_size_is_exact_or_marked(n):
    text = format_size(n)
    assert text.startswith("~") or parse_size(text) == n
    assert ".0" not in text.split(".")[0] + text[-2:]  # no "300.0M"
    assert parse_size(format_size(n, exact=True)) == n


def test_human_rate_range():
    assert human(1) == "1 byte" and human(512) == "512 bytes"
    assert human(300 << 20) == "300M (314572800 bytes)"
    assert format_rate(12.5 * 2**20) == "12.5M/s" and format_rate(300 << 20) == "300M/s"
    assert format_rate(0) == "0B/s" and format_rate(100.4) == "100B/s"
    assert size_range(4096, 1 << 40) == "between 4K and 1T (4096 to 1099511627776 bytes)"


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", [
    "a", "disk0", "vm_1.img", "A-b+c", "_x", "a..b",
    ".hidden", ".image.raw.Xa81Qz",  # rsync's temporary name
    "my disk", "-rf", "+x", "a\nb", "tab\there", "ünïcödé", "日本語", "...",
    "x" * 255, "é" * 127,  # 254 bytes of UTF-8
])
def test_check_name_accepts(name):
    assert P.check_name(name) == name


@pytest.mark.parametrize("name", [
    "", "/", "a/b", "/abs", "..", ".", "../x", "a\0b", "\0", "x" * 256,
    "é" * 128,  # 256 bytes in UTF-8 though only 128 characters
    "a@snap", "@", "\udcff",  # a byte that was not UTF-8 (os.fsdecode)
])
def test_check_name_rejects(name):
    with pytest.raises(P.RemoteError) as ei:
        P.check_name(name, "disk name")
    assert ei.value.code == P.E_INVALID
    assert "disk name" in ei.value.message


@pytest.mark.parametrize("name", ["a", "pool0", "A-b+c", "x" * 128])
def test_check_container_name_accepts(name):
    assert P.check_container_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "a b", "-rf", "a@b", "x" * 129, "é"])
def test_check_container_name_rejects(name):
    with pytest.raises(P.RemoteError) as ei:
        P.check_container_name(name)
    assert ei.value.code == P.E_INVALID and "container name" in ei.value.message


@pytest.mark.parametrize("name,want", [
    ("plain.img", "plain.img"), ("my disk", "'my disk'"), ("it's", "'it'\"'\"'s'"),
    ("a\nb", "$'a\\x0ab'"), ("q'\x01", "$'q\\'\\x01'"),
])
def test_names_are_shown_quoted_in_tables(name, want):
    from controller.cli_format import shown
    assert shown(name) == want


@pytest.mark.parametrize("bad", [None, 5, b"abc", ["a"]])
def test_check_name_rejects_non_strings(bad):
    with pytest.raises(P.RemoteError):
        P.check_name(bad)


# ---------------------------------------------------------------- argument schemas


def test_validate_args_fills_defaults():
    got = P.validate_args("disk.create", {"name": "d", "size": 4096})
    assert got["name"] == "d" and got["size"] == 4096 and got["thick"] is False
    assert got["segment_size"] is None and got["container"] is None
    assert P.validate_args("status", None) == {}
    assert P.validate_args("status", {}) == {}
    assert P.validate_args("container.add", {"name": "c", "path": "/x", "size": None})[
        "size"] is None


@pytest.mark.parametrize("op,args,what", [
    ("disk.create", {"name": "d", "size": "big"}, "size"),
    ("disk.create", {"name": "d", "size": True}, "size"),  # bool is not an int here
    ("disk.create", {"name": "d", "size": False}, "size"),
    ("disk.create", {"name": "d", "size": 1.0}, "size"),
    ("disk.create", {"name": "d", "size": None}, "size"),
    ("disk.create", {"name": "d", "size": 1, "thick": 1}, "thick"),  # int is not a bool
    ("disk.create", {"name": 5, "size": 1}, "name"),
    ("disk.create", {"name": b"d", "size": 1}, "name"),
    ("disk.resize", {"name": "d", "size": [1]}, "size"),
    ("disk.resize", {"name": "d", "size": 1, "allow_shrink": "yes"}, "allow_shrink"),
    ("container.add", {"name": "c", "path": 7}, "path"),
    ("container.add", {"name": "c", "path": "/x", "size": True}, "size"),
    ("disk.map", {"name": "d", "limit": True}, "limit"),
])
def test_validate_args_rejects_wrong_types(op, args, what):
    with pytest.raises(P.RemoteError) as ei:
        P.validate_args(op, args)
    assert ei.value.code == P.E_INVALID
    assert repr(what) in ei.value.message


def test_validate_args_rejects_missing_and_extra():
    with pytest.raises(P.RemoteError, match="missing argument 'size'"):
        P.validate_args("disk.create", {"name": "d"})
    with pytest.raises(P.RemoteError, match="missing argument 'name'"):
        P.validate_args("disk.rm", {})
    with pytest.raises(P.RemoteError, match="unexpected argument.*bogus"):
        P.validate_args("disk.rm", {"name": "d", "bogus": 1})
    with pytest.raises(P.RemoteError, match="must be a map"):
        P.validate_args("disk.rm", ["d"])


@pytest.mark.parametrize("op", ["nope", "", "disk.format", "hello", "disk_create"])
def test_validate_args_rejects_unknown_ops(op):
    with pytest.raises(P.RemoteError) as ei:
        P.validate_args(op, {})
    assert ei.value.code == P.E_UNSUPPORTED


# ---------------------------------------------------------------- codec


def test_codec_unpack_limits():
    assert codec.unpack(codec.pack({"a": [1, b"x", "y"]})) == {"a": [1, b"x", "y"]}
    with pytest.raises(codec.CodecError):
        codec.unpack(b"\xc1")  # never-used msgpack byte
    with pytest.raises(codec.CodecError):
        codec.unpack(codec.pack({1: 2}))  # non-string map key
    with pytest.raises(codec.CodecError):
        codec.unpack(msgpack.packb(msgpack.ExtType(5, b"x")))
    with pytest.raises(codec.CodecError):
        codec.unpack(b"\x00" * 100, max_size=10)
    with pytest.raises(codec.CodecError):
        codec.unpack(b"\xdb\xff\xff\xff\xff")  # str32 claiming 4 GiB, payload missing
    with pytest.raises(codec.CodecError):
        codec.wire_length(struct.pack(">I", 2 << 30), max_size=codec.MAX_REQUEST_FRAME)


def test_journal_frame_roundtrip_and_damage():
    rec = {"op": "x", "seq": 1, "data": b"\x00" * 10}
    f = frames.encode(rec)
    assert frames.parse(f, 0) == (rec, len(f))
    assert frames.parse(b"junk" + f, 4) == (rec, len(f) + 4)
    for i in range(len(f)):
        for bit in range(8):
            g = bytearray(f)
            g[i] ^= 1 << bit
            assert frames.parse(bytes(g), 0) is None, (i, bit)
    for n in range(len(f)):
        assert frames.parse(f[:n], 0) is None


# ---------------------------------------------------------------- streaming frames


def _frames_and_ends(n: int = 12) -> tuple[bytes, list[int]]:
    """n frames of varied sizes (one holding the magic inside its payload)."""
    data, ends = b"", []
    for k in range(n):
        data += frames.encode({"seq": k, "pad": b"VJ01" * (k * 7 % 5) + b"x" * (k * 131 % 300)})
        ends.append(len(data))
    return data, ends


@pytest.mark.parametrize("chunk", [1, 5, 12, 13, 100, 1 << 20])
def test_frame_reader_streams_every_frame_whatever_the_chunk(chunk):
    import io

    data, ends = _frames_and_ends()
    reader = frames.FrameReader(io.BytesIO(data), chunk=chunk)
    got = []
    for obj in reader:
        got.append((obj["seq"], reader.end))
    assert got == list(enumerate(ends)) and reader.fault is None
    empty = frames.FrameReader(io.BytesIO(b""), chunk=chunk)
    assert list(empty) == [] and empty.end == 0 and empty.fault is None


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_frame_reader_stops_at_the_first_bad_frame_and_says_why(chunk):
    import io

    data, ends = _frames_and_ends()
    at = ends[4]  # the sixth frame starts here

    def read(buf: bytes) -> tuple[int, int, frames.Fault | None]:
        r = frames.FrameReader(io.BytesIO(buf), chunk=chunk)
        return len(list(r)), r.end, r.fault

    for cut in (at + 1, at + 11, at + 12, ends[5] - 1):
        assert read(data[:cut]) == (5, at, frames.Fault(at, frames.TRUNCATED)), cut
    bad = bytearray(data)
    bad[at] ^= 1  # the magic
    assert read(bytes(bad)) == (5, at, frames.Fault(at, frames.BAD_HEADER))
    bad = bytearray(data)
    bad[at + 4:at + 8] = (frames.MAX_JOURNAL_RECORD + 1).to_bytes(4, "big")
    assert read(bytes(bad)) == (5, at, frames.Fault(at, frames.BAD_HEADER))
    bad = bytearray(data)
    bad[ends[5] - 1] ^= 0x40  # the payload
    assert read(bytes(bad)) == (5, at, frames.Fault(at, frames.BAD_CRC))
    payload = b"\xc1"  # never valid msgpack
    frame = frames.HEADER.pack(frames.MAGIC, 1, frames.crc(1, payload)) + payload
    n, end, fault = read(data[:at] + frame + data[at:])
    assert (n, end) == (5, at) and fault is not None
    assert (fault.offset, fault.kind) == (at, frames.BAD_PAYLOAD) and "msgpack" in fault.detail


@pytest.mark.parametrize("chunk", [4, 5, 9, 64, 1 << 20])
def test_find_frame_after_damage_streams(chunk):
    import io

    data, ends = _frames_and_ends()
    f = io.BytesIO(data)
    for k in range(len(ends) - 2):
        # the next frame's start, whatever the magic inside payloads in between
        assert frames.find_frame_after(f, ends[k] - 1, chunk=chunk) == ends[k], (k, chunk)
        assert frames.find_frame_after(f, ends[k], chunk=chunk) == ends[k + 1], (k, chunk)
    assert frames.find_frame_after(f, ends[-2], chunk=chunk) is None
    assert frames.find_frame_after(io.BytesIO(data[:-1]), ends[-3], chunk=chunk) is None


def test_progress_bar_prints_our_units():
    """vdctl's bars (migrate, drain, export-diff, import-diff) count and rate in the
    project's binary units: tqdm's unit_scale said "MB/s" for powers of 1024."""
    import io

    from controller.progress import BAR_FORMAT, SizeBar

    f = io.StringIO()
    bar = SizeBar(total=3 << 30, desc="migrate d", file=f, disable=False,
                  bar_format=BAR_FORMAT, mininterval=0)
    bar.n = 3 << 29
    bar.refresh()
    bar.close()
    line = f.getvalue().rsplit("\r", 1)[-1]
    assert "| 1.5G/3G [" in line and "/s]" in line, line
    rate = line.rsplit(", ", 1)[1].split("]", 1)[0]
    assert re.fullmatch(r"(\d+(\.\d)?[KMGTPE]?|\d+B)/s", rate) or rate == "?/s", line
    assert "MB" not in line and "iB" not in line
