"""Bad input: vdctl arguments, raw RPC frames, and a client of another uid."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rig import PROC_LOGS, ControllerProc

from controller import codec

HELLO = {"id": 1, "op": "hello", "args": {"version": 2, "role": "admin"}}


def state_of(v) -> dict[str, str]:
    out = {"disks": v("disk", "ls", "--format", "json").out,
           "containers": v("container", "ls", "--format", "json").out}
    for d in json.loads(out["disks"]):
        out[d["name"]] = v("disk", "map", d["name"], "--format", "json").out
    return out


def populate(c: ControllerProc, d: Path) -> ControllerProc:
    """Two containers and two disks (one thick) in c, their files in d."""
    v = c.vdctl
    assert v("container", "add", "c1", str(d / "c1.img"), "--size", "64M").rc == 0
    assert v("container", "add", "c2", str(d / "c2.img"), "--size", "32M").rc == 0
    assert v("disk", "create", "d", "--size", "12345", "--thick").rc == 0
    assert v("disk", "create", "thin", "--size", "1G").rc == 0
    (d / "existing.img").write_bytes(b"\0" * 8192)
    return c


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControllerProc, Path]]:
    """One populated controller for the module's tests that change nothing (each
    checks that with state_of): the 70-odd bad inputs need no controller each."""
    d = tmp_path_factory.mktemp("badinput")
    c = ControllerProc(d / "state", d / "controller.log")
    c.start()
    try:
        yield populate(c, d), d
    finally:
        c.stop()


@pytest.fixture
def populated(shared: tuple[ControllerProc, Path]) -> ControllerProc:
    """The module's shared controller (see shared); its log is checked after each test
    that uses it (conftest's check_logs)."""
    c, _ = shared
    PROC_LOGS.append(c.log_path)
    return c


@pytest.fixture
def tmp(shared: tuple[ControllerProc, Path]) -> Path:
    """The shared controller's directory: its containers' files, the {tmp} of the cases."""
    return shared[1]


@pytest.fixture
def fresh(controller: ControllerProc, tmp_path: Path) -> ControllerProc:
    """A populated controller of its own, for a test that changes its state."""
    return populate(controller, tmp_path)


# ---------------------------------------------------------------- vdctl


ERRORS_RC1 = [
    (["disk", "info", "nope"], "no such disk"),
    (["disk", "rm", "nope"], "no such disk"),
    (["disk", "map", "nope"], "no such disk"),
    (["disk", "resize", "nope", "1G"], "no such disk"),
    (["disk", "resize", "nope", "+1G"], "no such disk"),
    (["container", "info", "nope"], "no such container"),
    (["container", "rm", "nope"], "no such container"),
    (["disk", "create", "x", "--size", "1M", "--container", "nope"], "no such container"),
    (["disk", "create", "d", "--size", "1M"], "already exists"),
    (["disk", "create", "thin", "--size", "1M", "--thick"], "already exists"),
    (["container", "add", "c1", "{tmp}/other.img", "--size", "2M"], "already exists"),
    (["container", "add", "c3", "{tmp}/c1.img"], "already container 'c1'"),
    (["disk", "create", "a/b", "--size", "2M"], "disk name"),
    (["disk", "create", "..", "--size", "2M"], "disk name"),
    (["disk", "create", "../x", "--size", "2M"], "disk name"),
    (["disk", "create", "a\0b", "--size", "2M"], "disk name"),
    (["disk", "create", "x" * 256, "--size", "2M"], "longer than 255 bytes"),
    (["disk", "create", "a@s", "--size", "2M"], "kept for snapshots"),
    (["disk", "create", ".", "--size", "2M"], "disk name"),
    (["disk", "create", "", "--size", "2M"], "must not be empty"),
    (["container", "add", "a/b", "{tmp}/ab.img", "--size", "2M"], "container name"),
    (["container", "add", "..", "{tmp}/dd.img", "--size", "2M"], "container name"),
    (["container", "add", "y" * 129, "{tmp}/y.img", "--size", "2M"], "longer than 128"),
    (["container", "add", "c9", "{tmp}/does-not-exist.img"], "does not exist"),
    (["container", "add", "c9", "{tmp}/no/such/dir/c.img", "--size", "2M"], "does not exist"),
    (["container", "add", "c9", "{tmp}/existing.img", "--size", "2M"], "less than --size"),
    (["container", "add", "c9", "{tmp}/tiny.img", "--size", "100"],
     "at least 1028K (1052672 bytes)"),
    (["container", "add", "c9", "{tmp}"], "neither a regular file"),
    (["disk", "create", "big", "--size", "200M", "--thick"], "free"),
    (["container", "rm", "c1"], "holds"),
    (["disk", "create", "x", "--size", "0"], "--size must be between 1B and 1E"),
    (["disk", "create", "x", "--size", "2E"], "--size must be between 1B and 1E"),
    (["disk", "create", "x", "--size", "1M", "--segment-size", "1000"], "segment size"),
    (["disk", "resize", "d", "-1"], "--allow-shrink"),
    (["disk", "resize", "d", "-1G", "--allow-shrink"], "cannot shrink"),
    (["disk", "resize", "d", "200M"], "free"),  # thick grow needs more than the pool has
]


@pytest.mark.parametrize("args,msg", ERRORS_RC1,
                         ids=lambda x: repr(x)[:40] if isinstance(x, list) else None)
def test_vdctl_errors(populated, tmp, args, msg):
    v = populated.vdctl
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    before = state_of(v)
    r = v(*args)
    assert r.rc == 1, (r.rc, r.out, r.err)
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdctl: error: "), r.err
    assert msg in lines[0]
    assert "Traceback" not in r.err and r.out == ""
    assert state_of(v) == before
    assert v("check").rc == 0
    assert not (tmp / "ab.img").exists() and not (tmp / "dd.img").exists()


USAGE_RC2 = [
    ["disk", "create", "x", "--size", "-1"],
    ["disk", "create", "x", "--size", "10Q"],
    ["disk", "create", "x", "--size", "1.5.G"],
    ["disk", "create", "x", "--size", "1.5"],
    ["disk", "create", "x", "--size", ""],
    ["disk", "create", "x", "--size", "99999999E"],
    ["disk", "create", "x"],
    ["container", "add", "c9", "{tmp}/c9.img", "--size", "10Q"],
    ["container", "add", "c9", "{tmp}/c9.img", "--size", "-1"],
    ["disk", "resize", "d", "10Q"],
    ["disk", "resize", "d", "+1.5.G"],
    ["disk", "resize", "d", "-1.5"],
    ["disk", "ls", "--format", "xml"],
    ["disk", "frobnicate"],
    ["nonsense"],
    [],
]


@pytest.mark.parametrize("args", USAGE_RC2, ids=lambda a: " ".join(a)[:40] or "empty")
def test_vdctl_usage_errors(populated, tmp, args):
    v = populated.vdctl
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    before = state_of(v)
    r = v(*args)
    assert r.rc == 2, (r.rc, r.err)
    last = r.err.splitlines()[-1]
    assert last.startswith("vdctl") and "error:" in last and "Traceback" not in r.err
    assert "neg:" not in r.err
    assert state_of(v) == before
    assert not (tmp / "c9.img").exists()


def test_thick_fits_when_pinned_and_fails_when_not(fresh):
    v = fresh.vdctl
    assert v("disk", "create", "p", "--size", "20M", "--thick", "--container", "c2").rc == 0
    r = v("disk", "create", "q", "--size", "20M", "--thick", "--container", "c2")
    assert r.rc == 1 and "container 'c2'" in r.err
    assert v("check").rc == 0


# ---------------------------------------------------------------- raw frames


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_raw_sockets():
    yield
    while _OPEN:
        _OPEN.pop().close()


class Raw:
    """A plain socket speaking the wire format by hand."""

    def __init__(self, path: Path, timeout: float = 5.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _OPEN.append(self.s)
        self.s.settimeout(timeout)
        self.s.connect(str(path))

    def send(self, obj: Any) -> None:
        self.send_raw(codec.wire_frame(obj))

    def send_raw(self, data: bytes) -> None:
        try:
            self.s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already hung up; recv() will see it

    def _exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.s.recv(n - len(buf))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def recv(self) -> dict[str, Any] | None:
        """The next frame, or None once the server has closed the connection."""
        h = self._exact(4)
        if h is None:
            return None
        (n,) = struct.unpack(">I", h)
        payload = self._exact(n)
        assert payload is not None
        return codec.unpack(payload, max_size=codec.MAX_RESPONSE_FRAME)

    def closed(self) -> bool:
        """Drain replies until EOF; True if the server closed the connection."""
        while True:
            try:
                msg = self.recv()
            except TimeoutError:
                return False
            if msg is None:
                return True

    def hello(self) -> None:
        self.send(HELLO)
        r = self.recv()
        assert r is not None and r["ok"] and r["id"] == 1, r

    def close(self) -> None:
        self.s.close()


def still_serving(controller) -> None:
    c = Raw(controller.sock)
    c.hello()
    c.send({"id": 2, "op": "status", "args": {}})
    r = c.recv()
    assert r is not None and r["ok"] and r["id"] == 2
    c.close()
    assert controller.vdctl("disk", "ls").rc == 0


@pytest.mark.parametrize("frame", [
    b"\x00\x00\x00\x01\xc1",  # 0xc1 is never valid msgpack
    b"\x00\x00\x00\x02\x92\x01",  # array claims 2 items, frame holds 1
    b"\x00\x00\x00\x05\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB inside a tiny frame
    struct.pack(">I", 2 << 30) + b"\x80" * 64,  # 2 GiB length prefix
    struct.pack(">I", (1 << 20) + 1) + b"\x80" * 64,  # just over the 1 MiB cap
    b"\x00\x00\x00\x01\x01",  # valid msgpack, not a map
    codec.wire_frame({"id": "1", "op": "status"}),  # id must be an int
    codec.wire_frame({"id": True, "op": "status"}),
    codec.wire_frame({"id": 2, "op": 5}),
    codec.wire_frame({1: 2}),  # non-string key
], ids=["c1", "short-array", "str32", "2GiB", "cap+1", "not-map", "str-id", "bool-id",
        "int-op", "int-key"])
def test_malformed_frames_close_only_that_connection(populated, frame):
    before = state_of(populated.vdctl)
    bystander = Raw(populated.sock)
    bystander.hello()
    c = Raw(populated.sock)
    c.hello()
    c.send_raw(frame)
    replies = []
    while (r := c.recv()) is not None:
        replies.append(r)
    assert all(not r.get("ok") for r in replies), replies
    # the bystander's connection survives, and new clients are served
    bystander.send({"id": 5, "op": "status", "args": {}})
    r = bystander.recv()
    assert r is not None and r["ok"] and r["id"] == 5
    still_serving(populated)
    assert state_of(populated.vdctl) == before


@pytest.mark.parametrize("args,code", [
    ({"name": "x", "size": "big"}, "invalid"),
    ({"name": "x", "size": True}, "invalid"),
    ({"name": "x", "size": 1.5}, "invalid"),
    ({"name": "x", "size": -5}, "invalid"),
    ({"name": "x", "size": 1 << 62}, "invalid"),
    ({"name": "x"}, "invalid"),
    ({"name": "x", "size": 4096, "evil": 1}, "invalid"),
    ({"name": 7, "size": 4096}, "invalid"),
    ({"name": "a/b", "size": 4096}, "invalid"),
    ({"name": "x", "size": 4096, "thick": "yes"}, "invalid"),
    ({"name": "x", "size": 4096, "container": 3}, "invalid"),
    ([1, 2], "invalid"),
])
def test_wrong_field_types_get_an_error_reply(populated, args, code):
    before = state_of(populated.vdctl)
    c = Raw(populated.sock)
    c.hello()
    c.send({"id": 7, "op": "disk.create", "args": args})
    r = c.recv()
    assert r is not None and r["id"] == 7 and r["ok"] is False
    assert r["error"]["code"] == code and r["error"]["message"]
    # the connection stays usable after an error reply
    c.send({"id": 8, "op": "status", "args": {}})
    r = c.recv()
    assert r is not None and r["ok"] and r["id"] == 8
    c.close()
    assert state_of(populated.vdctl) == before


def test_unknown_op_gets_an_error_reply(populated):
    c = Raw(populated.sock)
    c.hello()
    c.send({"id": 2, "op": "disk.format", "args": {}})
    r = c.recv()
    assert r is not None and r["id"] == 2 and not r["ok"]
    assert r["error"]["code"] == "unsupported"
    c.send({"id": 3, "op": "hello", "args": {"version": 2, "role": "admin"}})
    r = c.recv()
    assert r is not None and r["id"] == 3 and not r["ok"]  # hello twice is not an op
    c.close()
    still_serving(populated)


@pytest.mark.parametrize("first", [
    {"id": 1, "op": "status", "args": {}},
    {"id": 1, "op": "disk.rm", "args": {"name": "d"}},
    {"id": 1, "op": "hello", "args": {"version": 99, "role": "admin"}},
    {"id": 1, "op": "hello", "args": {"version": 2, "role": "root"}},
    {"id": 1, "op": "hello", "args": None},
], ids=["status", "disk.rm", "version", "role", "no-args"])
def test_requests_before_a_valid_hello_are_refused(populated, first):
    before = state_of(populated.vdctl)
    c = Raw(populated.sock)
    c.send(first)
    c.send({"id": 2, "op": "disk.rm", "args": {"name": "d"}})
    replies = []
    while (r := c.recv()) is not None:
        replies.append(r)
    assert all(not r.get("ok") for r in replies), replies
    still_serving(populated)
    assert state_of(populated.vdctl) == before


def test_stalled_frames_do_not_block_others(fresh):
    """A half-sent frame and a silent client hold only their own connections, which the
    server closes after its deadline."""
    stalled = Raw(fresh.sock, timeout=20)
    stalled.hello()
    stalled.send_raw(struct.pack(">I", 100) + b"\x81\xa2id")  # 4+4 of 104 bytes
    header_only = Raw(fresh.sock, timeout=20)
    header_only.hello()
    header_only.send_raw(b"\x00\x00")  # half a length prefix
    silent = Raw(fresh.sock, timeout=20)  # never says hello
    t0 = time.monotonic()
    for _ in range(3):
        still_serving(fresh)
    assert fresh.vdctl("disk", "create", "more", "--size", "1M", "--thick").rc == 0
    assert time.monotonic() - t0 < 5, "other clients were held up"
    for conn in (stalled, header_only, silent):
        assert conn.closed(), "a stalled connection was never closed"
    assert time.monotonic() - t0 < 20
    still_serving(fresh)


def test_many_bad_clients_then_good_one(populated):
    for i in range(30):
        c = Raw(populated.sock)
        c.send_raw(os.urandom(64) if i % 2 else b"\xff\xff\xff\xff")
        c.close()
    still_serving(populated)


# ---------------------------------------------------------------- other users


CHILD = r"""
import json, socket, sys
frames = [bytes.fromhex(h) for h in sys.argv[2:]]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.errno}))
    sys.exit(0)
errors = []
for f in frames:
    try:
        s.sendall(f)
    except OSError as e:  # the server may hang up first: still read what it said
        errors.append(e.errno)
        break
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except OSError as e:
        errors.append(e.errno)
        break
    if not chunk:
        break
    data += chunk
print(json.dumps({"data": data.hex(), "errors": errors}))
"""


def run_as_nobody(sock: str) -> dict[str, Any]:
    frames = [codec.wire_frame(HELLO).hex(),
              codec.wire_frame({"id": 2, "op": "disk.rm", "args": {"name": "d"}}).hex(),
              codec.wire_frame({"id": 3, "op": "status", "args": {}}).hex()]
    py = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        py, "-c", CHILD, sock, *frames],
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def replies_of(hexdata: str) -> list[dict[str, Any]]:
    data = bytes.fromhex(hexdata)
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        out.append(codec.unpack(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def test_socket_permissions(populated):
    assert stat.S_IMODE(os.stat(populated.sock).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(populated.sock).st_mode)
    assert stat.S_IMODE(os.stat(populated.sock.parent).st_mode) == 0o700


def test_other_user_cannot_run_an_op(populated):
    before = state_of(populated.vdctl)
    res = run_as_nobody(str(populated.sock))
    if "connect" not in res:
        assert all(not r.get("ok") for r in replies_of(res["data"])), res
    assert state_of(populated.vdctl) == before


def test_other_user_refused_by_peer_credentials(tmp_path):
    """Even with the socket's permissions opened up, a client of another uid is refused
    (SO_PEERCRED), so the check does not rest on file modes alone."""
    pub = Path(tempfile.mkdtemp(prefix="virtfs-pub-", dir="/tmp"))
    try:
        os.chmod(pub, 0o755)
        state = tmp_path / "state"
        c = ControllerProc(state, tmp_path / "ctl.log")
        c.start(["--listen", f"unix:{state}/controller.sock", "--listen",
                 f"unix:{pub}/ctl.sock"])
        try:
            assert c.vdctl("container", "add", "c1", str(tmp_path / "c.img"), "--size",
                           "16M").rc == 0
            assert c.vdctl("disk", "create", "d", "--size", "1M", "--thick").rc == 0
            os.chmod(pub / "ctl.sock", 0o666)
            before = state_of(c.vdctl)
            res = run_as_nobody(str(pub / "ctl.sock"))
            assert "connect" not in res, f"could not reach the opened socket: {res}"
            replies = replies_of(res["data"])
            assert replies and all(not r.get("ok") for r in replies), res
            assert replies[0]["error"]["code"] == "unauthorized"
            assert state_of(c.vdctl) == before
            assert c.vdctl("disk", "info", "d").rc == 0
        finally:
            c.stop()
    finally:
        shutil.rmtree(pub, ignore_errors=True)


def test_virtfs_mount_refuses_a_pyfuse3_without_our_patches(tmp_path):
    """Upstream pyfuse3 (a plain `pip install .`) lacks fallocate and lseek: the mount
    would run with discard, zero-range and SEEK_HOLE failing. It refuses to start."""
    code = ("import sys, pyfuse3; del pyfuse3.Operations.fallocate; "
            "from virtfs.mount import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), "--state-dir",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert r.stderr.count("\n") == 1 and "lacks virtfs's fallocate patch" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()


def test_names_after_double_dash(fresh):
    """A name starting with "-" goes after "--", options before it (README); the other
    order is one line that shows the right command, and changes nothing."""
    v = fresh.vdctl
    before = state_of(v)
    r = v("disk", "create", "--", "-rf", "--size", "1M")
    assert r.rc == 2 and len(r.err.splitlines()) == 1 and r.err.startswith(
        "vdctl: error: options go before '--' (after it every word is a name): vdctl ")
    assert r.err.rstrip().endswith(" disk create --size 1M -- -rf"), r.err
    r = v("disk", "rm", "--", "-rf", "--format", "json")
    assert r.rc == 2 and " disk rm --format json -- -rf\n" in r.err, r.err
    assert state_of(v) == before
    assert v("disk", "create", "--size", "1M", "--", "-rf").rc == 0
    assert v("disk", "create", "--size", "1M", "--", "--thick").rc == 0  # a name too
    names = [d["name"] for d in json.loads(v("disk", "ls", "--format", "json").out)]
    assert "-rf" in names and "--thick" in names
    assert v("disk", "rm", "--", "-rf").rc == 0
