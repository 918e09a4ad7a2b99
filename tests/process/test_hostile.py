"""Hostile input over the Unix socket and over tcp:// with TLS: fuzzed frames and
arguments, and clients that misbehave on purpose. The controller stays up, serves
the others, and does not grow. (tests/process/test_badinput.py has the Unix-only cases
that need no TLS: malformed frames, stalls, other users.)
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from conftest import Pki, log_problems, tcp_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rig import ControllerProc, run_vdctl

from controller import codec
from controller import protocol as P
from controller.server import HELLO_MAX_FRAME
from controller.transport import FrameError, FrameReader

# ---------------------------------------------------------------- in-process fuzz

leaves = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
          | st.text(max_size=40) | st.binary(max_size=40))
values = st.recursive(leaves, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_codec_unpack_raises_only_codec_error(data):
    try:
        codec.unpack(data)
    except codec.CodecError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=64) | st.builds(codec.wire_frame, values), max_size=6),
       st.integers(1, 50))
def test_frame_reader_fuzz(chunks, step):
    """Any byte stream, cut anywhere: frames, FrameError or CodecError, nothing else;
    nothing past the cap is ever buffered beyond one read."""
    data = b"".join(chunks)

    async def main() -> None:
        stream = trio.testing.MemoryReceiveStream()
        for i in range(0, len(data), step):
            stream.put_data(data[i:i + step])
        stream.put_eof()
        reader = FrameReader(stream, HELLO_MAX_FRAME)
        try:
            while await reader.read() is not None:
                assert len(reader.buf) <= HELLO_MAX_FRAME + 4 + (1 << 16)
        except (FrameError, codec.CodecError):
            pass

    trio.run(main)


@settings(max_examples=250, deadline=None)
@given(st.sampled_from(sorted(P.OPS)), st.one_of(
    values,
    st.dictionaries(st.sampled_from(["name", "size", "path", "new", "offset", "length", "to",
                                     "id", "write", "force", "thick", "pid", "mtime", "x"]),
                    values, max_size=6)))
def test_validate_args_fuzz(op, args):
    """Every op's schema: a map with exactly the declared types, or RemoteError."""
    try:
        out = P.validate_args(op, args)
    except P.RemoteError as e:
        assert e.code in (P.E_INVALID, P.E_UNSUPPORTED) and e.message
        return
    fields = P.OPS[op][0]
    assert set(out) == {f.name for f in fields}
    for f in fields:
        v = out[f.name]
        if f.name in (args or {}):
            assert any((type(v) is t) if t in (bool, type(None)) else
                       (isinstance(v, t) and type(v) is not bool) for t in f.types), (f, v)


def test_timestamp_ext_decodes_to_something_no_schema_takes():
    """msgpack's timestamp ext (-1) cannot be routed to ext_hook; it decodes to a
    msgpack.Timestamp, which no field type accepts."""
    ts = codec.unpack(b"\xd6\xff\x00\x00\x00\x01")
    assert isinstance(ts, msgpack.Timestamp)
    with pytest.raises(P.RemoteError):
        P.validate_args("disk.info", {"name": ts})


def test_log_check_finds_tracebacks(tmp_path):
    """The check_logs fixture's parser can fail: it finds a traceback and an exception
    group, and an allow pattern lets exactly the matching ones through."""
    log = tmp_path / "x.log"
    log.write_text("2026-01-01 00:00:00,000 a INFO: fine\n"
                   "2026-01-01 00:00:01,000 a ERROR: boom\n"
                   "Traceback (most recent call last):\n  File x\nValueError: boom\n"
                   "2026-01-01 00:00:02,000 a INFO: fine\n"
                   "  + Exception Group Traceback (most recent call last):\n"
                   "  | ExceptionGroup: x (1 sub-exception)\n")
    assert len(log_problems(log)) == 2
    import re
    assert len(log_problems(log, re.compile("ValueError: boom"))) == 1
    log.write_text("2026-01-01 00:00:00,000 a INFO: all good\n")
    assert log_problems(log) == []


# ---------------------------------------------------------------- hostile clients

HELLO = {"version": 2, "role": "admin"}


class Peer:
    """A hand-written client on the Unix socket or on tcp:// (TLS, token in hello)."""

    def __init__(self, ctl: Ctl, kind: str, *, cert: bool = True, timeout: float = 10):
        self.kind = kind
        self.token = ctl.token
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(str(ctl.proc.sock))
            self.s: Any = s
        else:
            raw = socket.create_connection(("127.0.0.1", ctl.port), timeout=timeout)
            ctx = ssl.create_default_context(cafile=str(ctl.pki.ca))
            if cert:
                ctx.load_cert_chain(str(ctl.pki.client_cert), str(ctl.pki.client_key))
            self.s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")

    def send_raw(self, data: bytes) -> None:
        try:
            self.s.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass

    def send(self, obj: Any) -> None:
        self.send_raw(codec.wire_frame(obj))

    def _exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.s.recv(n - len(buf))
            except (ConnectionResetError, ssl.SSLError):
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def recv(self) -> dict[str, Any] | None:
        h = self._exact(4)
        if h is None:
            return None
        payload = self._exact(struct.unpack(">I", h)[0])
        return None if payload is None else codec.unpack(payload,
                                                         max_size=codec.MAX_RESPONSE_FRAME)

    def hello(self, token: str | None = None) -> dict[str, Any] | None:
        args = dict(HELLO)
        if self.kind == "tcp":
            args["token"] = self.token if token is None else token
        self.send({"id": 1, "op": "hello", "args": args})
        return self.recv()

    def call(self, rid: int, op: str, args: Any) -> dict[str, Any] | None:
        self.send({"id": rid, "op": op, "args": args})
        return self.recv()

    def until_closed(self) -> list[dict[str, Any]]:
        out = []
        while (r := self.recv()) is not None:
            out.append(r)
        return out

    def close(self) -> None:
        try:
            self.s.close()
        except OSError:
            pass


class Ctl:
    def __init__(self, proc: ControllerProc, port: int, pki: Pki, tmp: Path):
        self.proc, self.port, self.pki, self.tmp = proc, port, pki, tmp
        self.token = pki.token.read_text().strip()

    def serving(self, kind: str) -> None:
        p = Peer(self, kind)
        try:
            r = p.hello()
            assert r is not None and r["ok"], r
            r = p.call(2, "status", {})
            assert r is not None and r["ok"] and r["id"] == 2, r
        finally:
            p.close()


@pytest.fixture
def ctl(tmp_path, pki):
    c = ControllerProc(tmp_path / "state", tmp_path / "controller.log")
    c.start(["--listen", f"unix:{c.sock}", "--listen", "tcp://127.0.0.1:0",
             *pki.server_args()])
    try:
        v = c.vdctl
        assert v("container", "add", "c1", str(tmp_path / "c1.img"), "--size", "64M").rc == 0
        assert v("disk", "create", "d", "--size", "1M", "--thick").rc == 0
        yield Ctl(c, tcp_port(c.log_path), pki, tmp_path)
    finally:
        c.stop()


# Each case: (name, after hello?, bytes to send). The server closes the connection.
FRAMES = [
    ("oversized-prefix", True, struct.pack(">I", 0xFFFFFFFF) + b"\x80" * 16),
    ("over-cap-prefix", True, struct.pack(">I", codec.MAX_REQUEST_FRAME + 1) + b"\x80"),
    ("big-before-hello", False, struct.pack(">I", HELLO_MAX_FRAME + 1) + b"\x80"),
    ("deep-nesting", True, (lambda p: struct.pack(">I", len(p)) + p)(b"\x91" * 200000 + b"\xc0")),
    ("huge-array-header", True, b"\x00\x00\x00\x05\xdd\xff\xff\xff\xff"),
    ("huge-map-header", True, b"\x00\x00\x00\x05\xdf\xff\xff\xff\xff"),
    ("huge-bin-header", True, b"\x00\x00\x00\x05\xc6\xff\xff\xff\xff"),
    ("ext-type", True, codec.WIRE_HEADER.pack(3) + b"\xd4\x05\x00"),
    ("ext-in-request", True, (lambda p: struct.pack(">I", len(p)) + p)(
        b"\x83\xa2id\x02\xa2op\xa6status\xa4args\xd4\x07\x00")),
    ("not-a-map", True, codec.wire_frame([1, 2, 3])),
    ("garbage", True, struct.pack(">I", 64) + bytes(range(192, 256))),
    ("hello-garbage", False, codec.wire_frame({"id": 1, "op": "hello", "args": [1] * 10})),
]


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("name,after_hello,data", FRAMES, ids=[f[0] for f in FRAMES])
def test_bad_frames(ctl, kind, name, after_hello, data):
    bystander = Peer(ctl, kind)
    assert bystander.hello()["ok"]
    p = Peer(ctl, kind)
    if after_hello:
        assert p.hello()["ok"]
    p.send_raw(data)
    replies = p.until_closed()
    assert all(not r.get("ok") for r in replies), replies
    p.close()
    r = bystander.call(9, "status", {})
    assert r is not None and r["ok"], r
    bystander.close()
    ctl.serving("unix")
    ctl.serving("tcp")


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_bad_requests_get_error_replies(ctl, kind, tmp_path):
    """Wrong types, unknown ops, traversal in names, container paths that escape or do
    not exist, a timestamp ext: each an error reply; the connection stays usable and
    nothing changes."""
    before = run_vdctl("--state-dir", str(ctl.proc.state_dir), "disk", "ls", "--format",
                       "json").out
    p = Peer(ctl, kind)
    assert p.hello()["ok"]
    t = str(tmp_path)
    cases: list[tuple[str, Any]] = [
        ("disk.create", {"name": "x", "size": "1G"}),
        ("disk.create", {"name": ["x"], "size": 4096}),
        ("disk.create", {"name": "x", "size": 4096.0}),
        ("disk.create", {"name": "x", "size": 1 << 63}),
        ("disk.create", {"name": "../../etc/passwd", "size": 4096}),
        ("disk.create", {"name": "..", "size": 4096}),
        ("disk.create", {"name": "a/../b", "size": 4096}),
        ("disk.create", {"name": "a\0b", "size": 4096}),
        ("disk.rename", {"name": "d", "new": "../d"}),
        ("disk.rename", {"name": "d", "new": "/deleted/1/d"}),
        ("disk.info", {"name": "../d"}),
        ("container.add", {"name": "../c", "path": f"{t}/x.img", "size": 1 << 20}),
        ("container.add", {"name": "c9", "path": "relative.img", "size": 1 << 20}),
        ("container.add", {"name": "c9", "path": f"{t}/../{os.path.basename(t)}/x.img",
                           "size": 1 << 20}),
        ("container.add", {"name": "c9", "path": f"{t}//x.img", "size": 1 << 20}),
        ("container.add", {"name": "c9", "path": f"{t}/no/such/dir/x.img", "size": 1 << 20}),
        ("container.add", {"name": "c9", "path": f"{t}/x.img\0", "size": 1 << 20}),
        ("container.add", {"name": "c9", "path": "/proc/self/mem"}),
        ("disk.frobnicate", {}),
        ("", {}),
        ("hello", HELLO),
        ("agent.register", {"name": "x", "host": "h", "mount": "/m"}),  # admin may not
        ("disk.fault", {"name": "d", "offset": 0, "length": 4096, "write": True}),
        ("disk.info", {"name": msgpack.Timestamp(1)}),
        ("disk.info", {"name": "d", "extra": 1}),
        ("disk.info", None),
        ("disk.info", "d"),
    ]
    for i, (op, args) in enumerate(cases, start=10):
        r = p.call(i, op, args)
        assert r is not None and r["id"] == i and r["ok"] is False, (op, args, r)
        assert r["error"]["code"] in ("invalid", "unsupported", "unauthorized", "not_found"), r
    r = p.call(99, "status", {})
    assert r is not None and r["ok"]
    p.close()
    after = run_vdctl("--state-dir", str(ctl.proc.state_dir), "disk", "ls", "--format",
                      "json").out
    assert after == before
    assert not any(Path(t).glob("x.img*")) and not (Path(t) / "no").exists()
    assert ctl.proc.vdctl("check").rc == 0


def test_slowloris_tls(ctl):
    """Half a header, a silent TLS client, a half-done TLS handshake: each holds only
    its own connection, and the server closes them after its deadlines."""
    half = Peer(ctl, "tcp", timeout=30)
    assert half.hello()["ok"]
    half.send_raw(b"\x00\x00")
    silent = Peer(ctl, "tcp", timeout=30)  # TLS done, never says hello
    raw = socket.create_connection(("127.0.0.1", ctl.port), timeout=30)
    raw.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello, then nothing
    t0 = time.monotonic()
    for _ in range(3):
        ctl.serving("tcp")
        ctl.serving("unix")
    assert time.monotonic() - t0 < 5
    assert half.until_closed() is not None
    assert silent.until_closed() is not None
    assert raw.recv(100) == b""
    assert time.monotonic() - t0 < 25
    for c in (half, silent):
        c.close()
    raw.close()
    ctl.serving("tcp")


def test_tls_refusals_leave_the_server_serving(ctl):
    for _ in range(5):
        p = Peer(ctl, "tcp", cert=False)  # the client-side handshake completes in TLS 1.3
        assert p.hello() is None  # then the server's alert: no certificate
        p.close()
        p = Peer(ctl, "tcp")
        r = p.hello(token="0" * 64)
        assert r is not None and not r["ok"] and r["error"]["code"] == "unauthorized"
        assert ctl.token not in repr(r)
        assert p.until_closed() is not None
        p.close()
        p = Peer(ctl, "tcp")
        r = p.call(1, "hello", {"version": 2, "role": "admin"})  # no token at all
        assert r is not None and not r["ok"] and r["error"]["code"] == "unauthorized"
        p.close()
    ctl.serving("tcp")
    assert ctl.token not in ctl.proc.log_path.read_text()


# ---------------------------------------------------------------- fuzz over the sockets


def _safe(op: str, args: Any, tmp: Path) -> Any:
    """Keep a fuzzed container path from creating files outside the test's directory:
    a str path becomes one under tmp (sometimes with an escape the server must refuse)."""
    if op == "container.add" and isinstance(args, dict) and isinstance(args.get("path"), str):
        tail = "".join(c for c in args["path"] if c.isalnum())[:20] or "p"
        args = {**args, "path": f"{tmp}/fz/{tail}" if len(tail) % 2 else f"{tmp}/../{tail}"}
    return args


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_fuzzed_requests_over_the_socket(ctl, kind):
    """Random ops with random (often nearly right) arguments on one connection: every
    request gets a well-formed reply with its id, the connection stays up, the table
    stays consistent."""
    (ctl.tmp / "fz").mkdir(exist_ok=True)
    p = Peer(ctl, kind, timeout=30)
    assert p.hello()["ok"]
    names = st.sampled_from(["d", "x", "c1", "d@s", "../d", "", "a" * 300, "/deleted/1/d"])
    fields = st.fixed_dictionaries({}, optional={
        "name": names | values, "size": st.integers(-1, 1 << 30) | values,
        "path": st.text(max_size=10), "new": names, "offset": st.integers(-1, 1 << 22),
        "length": st.integers(-1, 1 << 22), "to": names, "id": st.integers(-1, 5),
        "force": st.booleans(), "thick": st.booleans(), "junk": values})
    rid = [100]

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(st.sampled_from(sorted(P.OPS) + ["nope", "hello"]), fields | values)
    def one(op, args):
        rid[0] += 1
        r = p.call(rid[0], op, _safe(op, args, ctl.tmp))
        assert r is not None and r["id"] == rid[0] and isinstance(r["ok"], bool), (op, r)
        if not r["ok"]:
            assert r["error"]["code"] != "internal", (op, args, r)

    one()
    p.close()
    ctl.serving("unix")
    ctl.serving("tcp")
    assert ctl.proc.vdctl("check").rc == 0


# ---------------------------------------------------------------- memory


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def hostile_round(ctl: Ctl) -> None:
    """One connection of each hostile kind, on both transports."""
    for kind in ("unix", "tcp"):
        for _name, after_hello, data in FRAMES:
            p = Peer(ctl, kind)
            if after_hello:
                p.hello()
            p.send_raw(data)
            p.until_closed()
            p.close()
        p = Peer(ctl, kind)
        p.hello()
        for i in range(20):
            p.call(10 + i, "disk.create", {"name": "../x", "size": "big"})
        p.close()
        half = Peer(ctl, kind)  # a slowloris, abandoned by its client
        half.hello()
        half.send_raw(struct.pack(">I", 1000) + b"\x81")
        half.close()
    p = Peer(ctl, "tcp", cert=False)
    p.hello()
    p.close()
    p = Peer(ctl, "tcp")
    p.hello(token="1" * 64)
    p.close()


def test_memory_does_not_grow_under_hostile_clients(ctl):
    pid = ctl.proc.proc.pid
    for _ in range(3):  # warm up: imports, caches, the allocator's arenas
        hostile_round(ctl)
    before = rss_kib(pid)
    rounds = 15
    for _ in range(rounds):
        hostile_round(ctl)
    ctl.serving("unix")
    ctl.serving("tcp")
    after = rss_kib(pid)
    print(f"controller RSS: {before} KiB before, {after} KiB after {rounds} rounds of "
          f"{2 * len(FRAMES) + 6} hostile connections")
    assert after - before < 8 * 1024, (before, after)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_ack_flood_from_a_peer_that_reads_nothing(ctl, kind):
    """Acks and heartbeats bypass the per-connection request limit; a peer that sends
    thousands and reads no reply is cut off (MAX_UNLIMITED_INFLIGHT), not queued
    without end, and the others are served meanwhile."""
    p = Peer(ctl, kind, timeout=30)
    p.send({"id": 1, "op": "hello", "args": {"version": 2, "role": "agent",
                                             **({"token": ctl.token} if kind == "tcp"
                                                else {})}})
    frame = b"".join(codec.wire_frame({"id": 2 + i, "op": "agent.ack", "args": {"pid": i}})
                     for i in range(20000))
    p.s.settimeout(60)
    try:
        p.s.sendall(frame)  # the server stops reading once it has cut us off
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
        pass
    ctl.serving("unix")
    ctl.serving("tcp")
    p.until_closed()
    p.close()
    assert "acks and heartbeats unanswered" in ctl.proc.log_path.read_text()
