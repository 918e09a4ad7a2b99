"""The container label: who a container belongs to (format, reads and writes; docs/labels.md).

A labelled container reserves its first MiB (``LABEL_BYTES``): disks never get
space there, and its data stays aligned as LVM's 1 MiB data offset keeps a
PV's. Sector 0 holds the label, written once when the container joins an
installation:

=======  ====  ===================================================
offset   size  field (little-endian)
=======  ====  ===================================================
0        8     magic ``VIRTFSCL``
8        4     format version (1)
16       16    installation id (the controller's state, ``State.installation``)
32       16    container id (``Container.uuid``)
48       8     container size in bytes when labelled
56       4     LUN when labelled
64       8     labelled at (Unix time, float64)
72       128   container name (ASCII, NUL-padded)
508      4     CRC-32 of bytes 0..508
=======  ====  ===================================================

Sector 1 is the owner's heartbeat, rewritten every ``interval`` seconds while a
controller of the installation runs (as ZFS's multihost protection does): magic
``VIRTFSHB``, version, the interval and the hold (how long after its last beat
the owner's agents may still do I/O: their lease) in milliseconds, the
installation id, the controller run's id, a counter and the time, and a CRC-32.
Another installation may take a labelled container over (``container add
--force``) only after watching the sector stand still for ``takeover_wait``
seconds; the owner fails a container whose beats have not landed for
``STALE_BEATS`` intervals, which is less.

Like LVM's PV label and ZFS's vdev labels, the label is where every tool looks
first: at the start of the file or device. The I/O functions block (call them
from a worker thread); they use range-limited ``RWF_DSYNC`` writes, never an
fsync of the whole container, so they do not flush agents' data.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import time
import uuid
import zlib
from dataclasses import dataclass

from .protocol import BLOCK_SIZE
from .writegate import WriteGate, gate, unfenced

SECTOR = 512
MAGIC = b"VIRTFSCL"
HB_MAGIC = b"VIRTFSHB"
VERSION = 1
HEARTBEAT_INTERVAL = 2.0  # seconds between a controller's beats on each container
# the owner fails a container after this many intervals without a beat landing; a
# taker watches WATCH_BEATS intervals plus the owner's hold: the owner's agents have
# stopped by then (docs/labels.md has the argument)
STALE_BEATS = 4
WATCH_BEATS = 5
NAME_BYTES = 128  # protocol.MAX_CONTAINER_NAME_BYTES

_LABEL = struct.Struct("<8sI4x16s16sQI4xd128s")
_BEAT = struct.Struct("<8sIII16s16sQd")


def new_id() -> str:
    """A fresh installation or container id: 32 hex digits (a random UUID)."""
    return uuid.uuid4().hex


class LabelError(Exception):
    """A sector that is not a valid label or heartbeat (no magic, bad CRC, version)."""


@dataclass(frozen=True)
class Label:
    """A container's label: installation and container ids (32 hex digits each), the
    size (bytes), LUN and name it had when labelled, and when (Unix time)."""

    installation: str
    container: str
    size: int
    lun: int
    name: str
    labelled_at: float

    def owner(self) -> str:
        """One line naming the label's owner, for messages."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.labelled_at))
        return (f"installation {self.installation[:12]} as container {self.name!r} "
                f"(LUN {self.lun}, labelled {when})")


@dataclass(frozen=True)
class Beat:
    """One heartbeat: the owner's installation id, the id of the controller run that
    wrote it, its counter and time, its interval and hold (seconds)."""

    installation: str
    run: str
    counter: int
    at: float
    interval: float
    hold: float


def _seal(body: bytes) -> bytes:
    sector = body.ljust(SECTOR - 4, b"\0")
    return sector + struct.pack("<I", zlib.crc32(sector))


def _open(sector: bytes, magic: bytes) -> bytes | None:
    """The sector's body if it carries magic, None if it does not; LabelError if it
    carries magic but its CRC or version is wrong."""
    if len(sector) < SECTOR or sector[:8] != magic:
        return None
    body, (crc,) = sector[:SECTOR - 4], struct.unpack("<I", sector[SECTOR - 4:SECTOR])
    if zlib.crc32(body) != crc:
        raise LabelError(f"{magic.decode()} sector has a bad CRC")
    (version,) = struct.unpack_from("<I", body, 8)
    if version != VERSION:
        raise LabelError(f"{magic.decode()} sector has format version {version}, not "
                         f"{VERSION} (written by a newer virtfs?)")
    return body


def encode(label: Label) -> bytes:
    """Sector 0 (512 bytes) for label. ValueError if a field does not fit."""
    name = label.name.encode()[:NAME_BYTES]
    return _seal(_LABEL.pack(MAGIC, VERSION, bytes.fromhex(label.installation),
                             bytes.fromhex(label.container), label.size, label.lun,
                             label.labelled_at, name))


def decode(sector: bytes) -> Label | None:
    """The label in sector 0, None if there is none; LabelError if it is damaged."""
    body = _open(sector, MAGIC)
    if body is None:
        return None
    _m, _v, inst, cont, size, lun, at, name = _LABEL.unpack_from(body)
    return Label(inst.hex(), cont.hex(), size, lun, name.rstrip(b"\0").decode(errors="replace"),
                 at)


def judge(sector: bytes, installation: str | None, container: str | None) -> str | None:
    """None if sector 0 holds the label of container (id) of installation (id), else
    why not, in one line starting with its kind: "damaged", "missing", "claimed" (by
    another installation) or "foreign" (another container of this one)."""
    try:
        lab = decode(sector)
    except LabelError as e:
        return f"damaged: {e}"
    if lab is None:
        return "missing: no virtfs label where one was written"
    if lab.installation != installation:
        return f"claimed by {lab.owner()}"
    if lab.container != container:
        return f"foreign: it carries the label of another container ({lab.name!r})"
    return None


def encode_beat(beat: Beat) -> bytes:
    """Sector 1 (512 bytes) for beat."""
    return _seal(_BEAT.pack(HB_MAGIC, VERSION, round(beat.interval * 1000),
                            round(beat.hold * 1000), bytes.fromhex(beat.installation),
                            bytes.fromhex(beat.run), beat.counter, beat.at))


def decode_beat(sector: bytes) -> Beat | None:
    """The heartbeat in sector 1, None if there is none; LabelError if it is damaged."""
    body = _open(sector, HB_MAGIC)
    if body is None:
        return None
    _m, _v, interval, hold, inst, run, counter, at = _BEAT.unpack_from(body)
    return Beat(inst.hex(), run.hex(), counter, at, interval / 1000, hold / 1000)


def takeover_wait(beat: Beat | None, default_hold: float) -> float:
    """Seconds a heartbeat must stand still before its container may be taken over:
    WATCH_BEATS of the owner's intervals plus its hold. An owner that cannot beat
    fails the container after STALE_BEATS intervals, and its agents stop using it
    within the hold after that (docs/labels.md)."""
    if beat is None:
        return WATCH_BEATS * HEARTBEAT_INTERVAL + default_hold
    return WATCH_BEATS * max(beat.interval, 0.1) + beat.hold


# ------------------------------------------------------------ I/O (blocking)
def _pread(fd: int, length: int, offset: int) -> bytes:
    # preadv, not pread: a fault test's strace that injects errors into the data
    # path's pread64 calls leaves the label reads alone, and the other way round
    buf = bytearray(length)
    n = os.preadv(fd, [buf], offset)
    return bytes(buf[:n])


def read_sectors(path: str) -> tuple[bytes, bytes]:
    """Sectors 0 and 1 of path (short if the file is); OSError if it cannot be read.

    Drops the host's cached copy first (posix_fadvise DONTNEED), so a label another host
    wrote to a shared device is seen."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_sectors_fd(fd)
    finally:
        os.close(fd)


def read_sectors_fd(fd: int) -> tuple[bytes, bytes]:
    """Sectors 0 and 1 of an open container (see read_sectors)."""
    try:
        os.posix_fadvise(fd, 0, 2 * SECTOR, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # advice only
    data = _pread(fd, 2 * SECTOR, 0)
    return data[:SECTOR], data[SECTOR:]


def _write(path: str, data: bytes, offset: int, may_write: WriteGate) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        gate(may_write, f"the label block at {offset}", path)
        n = os.pwritev(fd, [data], offset, os.RWF_DSYNC)
        if n != len(data):
            raise OSError(errno.EIO, f"short write of the label on {path}")
    finally:
        os.close(fd)


def write_label(path: str, label: Label, beat: Beat, may_write: WriteGate = unfenced) -> None:
    """Write label, a first heartbeat and zeros over the rest of the first 4 KiB,
    durably (RWF_DSYNC); the rest of the reserved MiB is left as it is (thin on the
    host). OSError on failure (writegate.Fenced if may_write says no, before the write)."""
    block = (encode(label) + encode_beat(beat)).ljust(BLOCK_SIZE, b"\0")
    _write(path, block, 0, may_write)


def write_beat(path: str, beat: Beat, may_write: WriteGate = unfenced) -> None:
    """Rewrite the heartbeat sector only, durably (RWF_DSYNC). OSError on failure
    (writegate.Fenced if may_write says no, before the write)."""
    _write(path, encode_beat(beat), SECTOR, may_write)


def wipe(path: str, may_write: WriteGate = unfenced) -> None:
    """Zero the first 4 KiB (label and heartbeat: a removed container may join another
    installation without --force, as pvremove allows). OSError on failure (writegate.Fenced
    if may_write says no, before the write)."""
    _write(path, bytes(BLOCK_SIZE), 0, may_write)


def signatures(path: str) -> list[str]:
    """Other formats blkid(8) finds on path (low-level probing, ``blkid -p``): e.g.
    ``["ext4 file system"]`` or ``["dos partition table"]``; [] only when blkid says
    it found nothing (exit 2). Anything it cannot tell (several signatures, an error,
    no blkid: util-linux, which scripts/sysdeps.sh installs) is named too, so the
    caller refuses it."""
    try:
        r = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True,
                           text=True, timeout=30)
    except FileNotFoundError:
        return ["something blkid could not check (blkid is missing: install util-linux)"]
    except subprocess.TimeoutExpired:
        return ["something blkid could not check in 30 s"]
    if r.returncode == 2:  # blkid(8): nothing found
        return []
    if r.returncode == 8:  # ambivalent: several signatures
        w = subprocess.run(["wipefs", "-n", "-O", "TYPE", path], capture_output=True,
                           text=True)
        kinds = sorted({x.strip() for x in w.stdout.splitlines()[1:] if x.strip()})
        return [f"several signatures ({', '.join(kinds) or 'blkid: ambivalent'})"]
    if r.returncode != 0:
        why = r.stderr.strip() or f"exit {r.returncode}"
        return [f"something blkid could not probe ({why})"]
    found = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    out = []
    if "TYPE" in found:
        kind = found.get("USAGE", "filesystem")
        what = {"filesystem": "file system", "raid": "RAID member",
                "crypto": "encrypted volume"}.get(kind, kind)
        out.append(f"{found['TYPE']} {what}")
    if "PTTYPE" in found:
        out.append(f"{found['PTTYPE']} partition table")
    return out


def wipe_signatures(path: str, may_write: WriteGate = unfenced) -> None:
    """Erase every signature blkid knows on path (``wipefs -a``), as ``pvcreate -ff``
    does; OSError if wipefs fails (writegate.Fenced if may_write says no before it runs)."""
    gate(may_write, "wipefs", path)
    r = subprocess.run(["wipefs", "-a", "-q", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(errno.EIO, f"wipefs {path}: {r.stderr.strip()}")
