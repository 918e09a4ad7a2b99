"""tcp:// with TLS 1.3 and a token: vdctl and virtfs-mount over TCP, and every refusal.

The PKI comes from conftest.make_pki (openssl, as docs/security.md shows).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Pki, tcp_port
from rig import BIN, ControllerProc, run_vdctl, wait_for

from controller import codec
from controller.transport import client_security, server_security

ROOT = Path(__file__).resolve().parents[2]


def start_tcp(tmp_path: Path, pki: Pki, *, client_certs: bool = True,
              extra: list[str] | None = None, name: str = "ctl") -> tuple[ControllerProc, str]:
    """A controller on its state dir's socket and on tcp://127.0.0.1:<free port>."""
    c = ControllerProc(tmp_path / f"{name}-state", tmp_path / f"{name}.log")
    c.start(["--listen", f"unix:{c.sock}", "--listen", "tcp://127.0.0.1:0",
             *pki.server_args(client_certs), *(extra or [])])
    return c, f"tcp://127.0.0.1:{tcp_port(c.log_path)}"


@pytest.fixture
def tcp_controller(tmp_path, pki):
    c, addr = start_tcp(tmp_path, pki)
    try:
        yield c, addr
    finally:
        c.stop()


def assert_secret_kept(pki: Pki, *texts: str) -> None:
    token = pki.token.read_text().strip()
    for t in texts:
        assert token not in t


def strict_handshake(ca: Path, srv: tuple[Path, Path], cli: tuple[Path, Path], host: str,
                     token: Path) -> str:
    """A TLS handshake between the controller's and a client's own contexts
    (transport.server_security / client_security, which verify strictly), over a
    socket pair: "" when both ends accept, else the client's error."""
    server = server_security(str(srv[0]), str(srv[1]), str(token), str(ca)).context
    client = client_security(tls_ca=str(ca), tls_cert=str(cli[0]), tls_key=str(cli[1]),
                             token_file=str(token), env={}).context
    assert client.verify_flags & ssl.VERIFY_X509_STRICT
    assert server.verify_flags & ssl.VERIFY_X509_STRICT
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    errors: list[str] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                s.sendall(s.recv(1))
        except (OSError, ssl.SSLError) as e:
            errors.append(f"server: {e}")

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname=host) as s:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
    except (OSError, ssl.SSLError) as e:
        return f"client: {getattr(e, 'verify_message', None) or e}"
    finally:
        a.close()
        t.join(15)
    return "; ".join(errors)


def test_test_pki_passes_strict_verification(pki):
    """Python 3.13 (Debian 13) verifies with VERIFY_X509_STRICT; we do on every Python."""
    assert strict_handshake(pki.ca, (pki.server_cert, pki.server_key),
                            (pki.client_cert, pki.client_key), "127.0.0.1", pki.token) == ""


def recipe(doc: str) -> str:
    """docs/security.md's openssl recipe: the first sh block of its "A test CA" section."""
    section = doc[doc.index("## A test CA"):]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m is not None
    return m.group(1)


def test_security_md_recipe_passes_strict_verification(tmp_path, pki):
    script = recipe((ROOT / "docs" / "security.md").read_text())
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    d = tmp_path / "pki"
    assert "srv.crt: OK" in p.stdout and "host1.crt: OK" in p.stdout
    assert strict_handshake(d / "ca.crt", (d / "srv.crt", d / "srv.key"),
                            (d / "host1.crt", d / "host1.key"), "10.0.0.1", d / "token") == ""
    # the check can fail: the same recipe without the CA's -addext lines (the recipe
    # before Debian 13) makes a CA that strict verification refuses
    old = re.sub(r"-addext basicConstraints=critical,CA:TRUE -addext \S+ \\\n\s*", "",
                 script).replace("mkdir pki", "mkdir old").replace("cd pki", "cd old")
    assert old != script
    p = subprocess.run(["bash", "-uo", "pipefail", "-c", old], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert "key usage" in p.stdout + p.stderr
    d = tmp_path / "old"
    err = strict_handshake(d / "ca.crt", (d / "srv.crt", d / "srv.key"),
                           (d / "host1.crt", d / "host1.key"), "10.0.0.1", d / "token")
    assert "CA cert does not include key usage extension" in err, err


def test_vdctl_over_tcp(tcp_controller, pki, tmp_path):
    c, addr = tcp_controller
    v = lambda *a: run_vdctl("--controller", addr, *pki.client_args(), *a)  # noqa: E731
    assert v("container", "add", "c1", str(tmp_path / "c1.img"), "--size", "64M").rc == 0
    assert v("disk", "create", "d", "--size", "8M").rc == 0
    r = v("disk", "ls", "--format", "json")
    assert r.rc == 0 and [d["name"] for d in r.json()] == ["d"]
    # the options may follow the verb too, as the other global options do
    r = run_vdctl("--controller", addr, "disk", "info", "d", *pki.client_args())
    assert r.rc == 0, r.err
    assert c.vdctl("disk", "info", "d").rc == 0  # the Unix socket serves as before
    assert_secret_kept(pki, c.log_path.read_text())


def test_vdctl_takes_the_environment(tcp_controller, pki, monkeypatch):
    _c, addr = tcp_controller
    monkeypatch.setenv("VIRTFS_TLS_CA", str(pki.ca))
    monkeypatch.setenv("VIRTFS_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("VIRTFS_TLS_KEY", str(pki.client_key))
    monkeypatch.setenv("VIRTFS_TOKEN_FILE", str(pki.token))
    monkeypatch.setenv("VIRTFS_CONTROLLER", addr)
    r = run_vdctl("status")
    assert r.rc == 0, r.err


def refusal(pki: Pki, addr: str, *args: str) -> str:
    r = run_vdctl("--controller", addr, *args, "status")
    assert r.rc == 1, (r.rc, r.out, r.err)
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdctl: error: "), r.err
    assert "Traceback" not in r.err and r.out == ""
    assert_secret_kept(pki, r.err)
    return lines[0]


def test_refusals(tcp_controller, pki, tmp_path):
    c, addr = tcp_controller
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0123456789abcdef0123456789abcdef\n")
    wrong.chmod(0o600)
    ca, tok = ["--tls-ca", str(pki.ca)], ["--token-file", str(pki.token)]
    cert = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    rogue = ["--tls-cert", str(pki.rogue_cert), "--tls-key", str(pki.rogue_key)]
    assert "client certificate" in refusal(pki, addr, *ca, *tok)  # none given
    assert "client certificate" in refusal(pki, addr, *ca, *tok, *rogue)  # another CA's
    assert "wrong or missing token" in refusal(pki, addr, *ca, "--token-file", str(wrong),
                                               *cert)
    # the controller's certificate from a CA we do not trust, or for another name
    assert "TLS handshake" in refusal(pki, addr, "--tls-ca", str(pki.dir / "rogue-ca.crt"),
                                      *tok, *cert)
    assert "Hostname mismatch" in refusal(pki, addr.replace("127.0.0.1", "localhost"), *ca,
                                          *tok, *cert)
    # usage: tcp:// without a token, a token readable by others
    r = run_vdctl("--controller", addr, *ca, "status")
    assert r.rc == 2 and "token" in r.err and len(r.err.splitlines()) == 1, r.err
    wrong.chmod(0o644)
    r = run_vdctl("--controller", addr, *ca, "--token-file", str(wrong), *cert, "status")
    assert r.rc == 2 and "chmod 600" in r.err, r.err
    r = run_vdctl("--controller", addr, "--tls-ca", str(tmp_path / "no-ca"), *tok, "status")
    assert r.rc == 2 and "cannot load the CA" in r.err, r.err
    r = run_vdctl("--controller", "tcp://127.0.0.1", "status")
    assert r.rc == 2 and "tcp://HOST:PORT" in r.err
    assert c.vdctl("status").rc == 0
    log = c.log_path.read_text()
    assert "wrong or missing token" in log and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log
    assert_secret_kept(pki, log)


def test_tls12_is_refused(tcp_controller, pki):
    _c, addr = tcp_controller
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    host, port = addr[6:].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.recv(1)


def test_server_certificate_only(tmp_path, pki):
    """Without --tls-ca the controller asks for no client certificate; the token is
    then the only credential."""
    c, addr = start_tcp(tmp_path, pki, client_certs=False)
    try:
        assert run_vdctl("--controller", addr, *pki.client_args(cert=False), "status").rc == 0
        assert run_vdctl("--controller", addr, *pki.client_args(), "status").rc == 0
    finally:
        c.stop()


@pytest.mark.parametrize("case", ["no-tls", "no-token", "token-mode", "short-token",
                                  "missing-cert", "bad-addr", "listen-dir"])
def test_controller_refuses_to_start(tmp_path, pki, case):
    tok = tmp_path / "tok"
    tok.write_text("x" * 8 if case == "short-token" else "y" * 40)
    tok.chmod(0o644 if case == "token-mode" else 0o600)
    args = {
        "no-tls": ["--listen", "tcp://0.0.0.0:0"],
        "no-token": ["--listen", "tcp://127.0.0.1:0", "--tls-cert", str(pki.server_cert),
                     "--tls-key", str(pki.server_key)],
        "token-mode": ["--listen", "tcp://0.0.0.0:0", *pki.server_args()[:4],
                       "--token-file", str(tok)],
        "short-token": ["--listen", "tcp://0.0.0.0:0", *pki.server_args()[:4],
                        "--token-file", str(tok)],
        "missing-cert": ["--listen", "tcp://0.0.0.0:0", "--tls-cert", str(tmp_path / "no"),
                         "--token-file", str(pki.token)],
        "bad-addr": ["--listen", "tcp://0.0.0.0"],
        # a Unix socket's directory is never created (the state dir's is)
        "listen-dir": ["--listen", f"unix:{tmp_path / 'nonexistent' / 'dir' / 's.sock'}"],
    }[case]
    p = subprocess.run([str(BIN / "virtfs-controller"), "--state-dir", str(tmp_path / "s"),
                        *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("virtfs-controller: error: ")
    if case != "bad-addr":
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "s").exists(), "the state dir was touched before the refusal"
    if case == "listen-dir":
        assert "no directory" in last and not (tmp_path / "nonexistent").exists(), last


def _hello_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(codec.wire_frame({"id": 1, "op": "hello",
                                "args": {"version": 2, "role": "admin"}}))
    return s


def test_connection_cap(tmp_path, pki):
    """With --max-connections 4, a fifth connection is closed at once; once one of the
    four goes, new clients are served again."""
    c, addr = start_tcp(tmp_path, pki, extra=["--max-connections", "4"])
    held = []
    try:
        for _ in range(4):
            s = _hello_unix(c.sock)
            assert s.recv(4096)  # the hello reply: the connection counts now
            held.append(s)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(10)
        extra.connect(str(c.sock))
        assert extra.recv(4096) == b""  # closed without a word
        extra.close()
        r = run_vdctl("--controller", addr, *pki.client_args(), "status")
        assert r.rc == 1
        held.pop().close()
        wait_for(lambda: c.vdctl("status").rc == 0, 10, "a free connection slot")
        assert "refusing connections" in c.log_path.read_text()
    finally:
        for s in held:
            s.close()
        c.stop()


def test_mount_over_tcp(tmp_path, pki, mount_factory):
    c, addr = start_tcp(tmp_path, pki)
    try:
        v = lambda *a: run_vdctl("--controller", addr, *pki.client_args(), *a)  # noqa: E731
        assert v("container", "add", "c1", str(tmp_path / "c1.img"), "--size", "64M").rc == 0
        assert v("disk", "create", "d", "--size", "8M").rc == 0
        m = mount_factory("m", controller=addr, args=pki.client_args(),
                          state_dir=tmp_path / "agent-state")
        data = os.urandom(1 << 20)
        with open(m.path / "d", "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(m.path / "d", "rb") as f:
            assert f.read(len(data)) == data
        agents = v("agent", "ls", "--format", "json").json()
        assert len(agents) == 1 and agents[0]["connected"]
        assert m.unmount() == 0
        assert_secret_kept(pki, m.log(), c.log_path.read_text())
    finally:
        c.stop()


def test_mount_refuses_tcp_without_token(tmp_path, pki):
    mnt = tmp_path / "m"
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTFS_")}
    p = subprocess.run([str(BIN / "virtfs-mount"), str(mnt), "--controller",
                        "tcp://127.0.0.1:9", "--tls-ca", str(pki.ca)],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 2 and "token" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mnt)


def mount_refusal(tmp_path: Path, addr: str, *args: str) -> tuple[str, float]:
    """virtfs-mount against addr with args: it must exit 1 at once (not after its 30 s
    connect timeout) with one line; returns that line and how long it took."""
    mnt = tmp_path / "m"
    mnt.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTFS_")}
    t0 = time.monotonic()
    try:
        p = subprocess.run([str(BIN / "virtfs-mount"), str(mnt), "--controller", addr, *args],
                           capture_output=True, text=True, timeout=60, env=env)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    took = time.monotonic() - t0
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert not os.path.ismount(mnt)
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("virtfs-mount: "), p.stderr
    return last, took


def test_mount_says_why_it_is_refused_at_once(tcp_controller, pki, tmp_path):
    """A wrong token, a missing client certificate or a controller certificate it does
    not trust: virtfs-mount exits 1 within seconds with the controller's reason, as
    vdctl does, instead of waiting 30 s and saying "no controller answered"."""
    c, addr = tcp_controller
    wrong = tmp_path / "wrong"
    wrong.write_text("fedcba9876543210fedcba9876543210\n")
    wrong.chmod(0o600)
    cert = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    line, took = mount_refusal(tmp_path, addr, "--tls-ca", str(pki.ca), *cert,
                               "--token-file", str(wrong))
    assert "wrong or missing token" in line and addr in line, line
    assert took < 15, took
    assert "fedcba9876543210" not in line + c.log_path.read_text()
    line, took = mount_refusal(tmp_path, addr, *pki.client_args(cert=False))
    assert "client certificate" in line and took < 15, (line, took)
    line, took = mount_refusal(tmp_path, addr, "--token-file", str(pki.token), *cert)
    assert "pass --tls-ca" in line and took < 15, (line, took)
    assert c.vdctl("status").rc == 0


def test_mount_that_finds_no_controller_says_why(tmp_path, pki):
    """No controller at all: the mount waits its --connect-timeout (default 30 s: a
    controller may be starting), then names the address and the last error."""
    line, took = mount_refusal(tmp_path, f"unix:{tmp_path / 'none.sock'}",
                               "--connect-timeout", "3")
    assert 2.9 <= took < 15, took
    assert "within 3 s" in line, line
    assert "no controller answered" in line and "No such file or directory" in line, line


def test_tls_handshake_failures_say_what_to_do(tcp_controller, pki):
    _c, addr = tcp_controller
    cert = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    tok = ["--token-file", str(pki.token)]
    # no --tls-ca: the system's CAs do not know ours
    assert "pass --tls-ca" in refusal(pki, addr, *tok, *cert)
    # another CA
    line = refusal(pki, addr, "--tls-ca", str(pki.dir / "rogue-ca.crt"), *tok, *cert)
    assert "rogue-ca.crt did not sign the controller's certificate" in line, line
    line = refusal(pki, addr.replace("127.0.0.1", "localhost"), "--tls-ca", str(pki.ca),
                   *tok, *cert)
    assert "subjectAltName" in line, line


def test_tls_file_errors_name_the_file(tmp_path, pki):
    """OpenSSL's "PEM lib" becomes which file is wrong and how, at vdctl and at the
    controller (exit 2, one line, before anything else)."""
    enc = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.client_key), "-aes256", "-passout",
                    "pass:secret", "-out", str(enc)], check=True, capture_output=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        ((pki.client_key, pki.client_cert), "holds a private key, not a certificate"),
        ((pki.client_cert, junk), f"{junk} is not a PEM private key"),
        ((pki.client_cert, enc), f"{enc} is encrypted with a passphrase"),
        ((pki.client_cert, pki.server_key),
         f"the key {pki.server_key} does not belong to the certificate {pki.client_cert}"),
        ((pki.client_cert, tmp_path / "missing.key"), "No such file or directory"),
    ]
    for (cert, key), want in cases:
        r = run_vdctl("--controller", "tcp://127.0.0.1:9", "--tls-ca", str(pki.ca),
                      "--token-file", str(pki.token), "--tls-cert", str(cert),
                      "--tls-key", str(key), "status")
        assert r.rc == 2 and len(r.err.splitlines()) == 1, r.err
        assert want in r.err and "PEM lib" not in r.err, r.err
        p = subprocess.run([str(BIN / "virtfs-controller"), "--state-dir",
                            str(tmp_path / "s"), "--listen", "tcp://127.0.0.1:0",
                            "--tls-cert", str(cert), "--tls-key", str(key),
                            "--token-file", str(pki.token)],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and want in p.stderr and "PEM lib" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    r = run_vdctl("--controller", "tcp://127.0.0.1:9", "--tls-ca", str(junk),
                  "--token-file", str(pki.token), "status")
    assert r.rc == 2 and f"{junk} holds no PEM certificate" in r.err, r.err
    r = run_vdctl("--controller", "tcp://127.0.0.1:9", "--tls-ca", str(pki.client_key),
                  "--token-file", str(pki.token), "status")
    assert r.rc == 2 and "holds a private key, not a CA certificate" in r.err, r.err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_mount_refuses_a_bad_timeout_with_one_line(tmp_path, value):
    mnt = tmp_path / "m"
    mnt.mkdir()
    for opt in ("--connect-timeout", "--fault-timeout"):
        p = subprocess.run([str(BIN / "virtfs-mount"), str(mnt), opt, value],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (p.returncode, p.stderr)
        assert f"invalid duration {value!r}" in p.stderr.strip().splitlines()[-1], p.stderr
        assert not os.path.ismount(mnt)
