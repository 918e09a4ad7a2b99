"""What the client and the server share on the wire: frames, addresses, TLS, the token.

- Frames: a 4-byte big-endian length and a msgpack map (``codec``);
  ``FrameReader`` reads them with a size cap and a deadline per frame.
- Addresses: ``unix:PATH`` or ``tcp://HOST:PORT`` (``parse_addr``).
- TLS 1.3 contexts for both ends (``server_security``, ``client_security``) and
  the shared token: read from a 0600 file (``load_token``), compared in constant
  time (``token_matches``). docs/security.md has the model.

Imports only ``codec`` from the controller, so the agent and vdctl can use it
without the server.
"""

from __future__ import annotations

import hmac
import os
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from . import codec
from .tlsfiles import TlsFileError, load_ca, load_cert_chain

FRAME_TIMEOUT = 10.0  # once a frame has begun, all of it must arrive within this
MIN_TOKEN_BYTES = 16

# options of virtfs-mount and vdctl, and the environment variables they fall back to
SECURITY_ENV = {"tls_ca": "VIRTFS_TLS_CA", "tls_cert": "VIRTFS_TLS_CERT",
                "tls_key": "VIRTFS_TLS_KEY", "token_file": "VIRTFS_TOKEN_FILE"}


class FrameError(Exception):
    """A frame that breaks the framing: cut short, too slow, or not a request."""


class FrameReader:
    """Reads length-prefixed frames from a trio stream with caps and deadlines.

    max_size: the largest payload accepted (bytes; codec.CodecError past it); a
    caller may raise it later (the server does after hello). A frame, once begun,
    must arrive within FRAME_TIMEOUT seconds (FrameError otherwise).
    """

    def __init__(self, stream: trio.abc.ReceiveStream, max_size: int):
        self.stream = stream
        self.max_size = max_size
        self.buf = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                if self.buf:
                    raise FrameError("connection closed in the middle of a frame")
                return False
            self.buf += chunk
        return True

    async def read(self) -> Any | None:
        """The next decoded frame, or None at a clean end of stream."""
        if not await self._fill(1):
            return None
        with trio.move_on_after(FRAME_TIMEOUT) as scope:
            await self._fill(4)
            length = codec.wire_length(bytes(self.buf[:4]), max_size=self.max_size)
            await self._fill(4 + length)
        if scope.cancelled_caught:
            raise FrameError(f"frame not complete within {FRAME_TIMEOUT:.0f} s")
        payload = bytes(self.buf[4 : 4 + length])
        del self.buf[: 4 + length]
        return codec.unpack(payload, max_size=self.max_size)


class SecurityConfigError(ValueError):
    """TLS or token settings that cannot be used (a one-line message, no secrets in it)."""


def load_token(path: str) -> bytes:
    """The shared token in the file at path: its content, surrounding whitespace removed.

    The token must be at least MIN_TOKEN_BYTES bytes of printable ASCII (make one
    with ``openssl rand -hex 32``), and the file readable by its owner only (mode
    0600 or 0400), as ssh insists for keys. Raises SecurityConfigError naming the
    file, never quoting its content.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(4097)
    except OSError as e:
        raise SecurityConfigError(f"cannot read the token file {path}: "
                                  f"{e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecurityConfigError(f"token file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise SecurityConfigError(f"token file {path} may be read by others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}")
    token = data.strip()
    if len(data) > 4096 or not token.isascii() or not all(33 <= b < 127 for b in token):
        raise SecurityConfigError(f"token file {path} must hold one line of printable ASCII "
                                  "(at most 4096 bytes), e.g. from 'openssl rand -hex 32'")
    if len(token) < MIN_TOKEN_BYTES:
        raise SecurityConfigError(f"the token in {path} is shorter than {MIN_TOKEN_BYTES} "
                                  "bytes; make one with 'openssl rand -hex 32'")
    return token


def strict_verification(ctx: ssl.SSLContext) -> None:
    """Verify the peer's chain with VERIFY_X509_STRICT, on every Python.

    Python 3.13 sets it in ``ssl.create_default_context`` (so Debian 13's python3
    refuses a CA without keyUsage: "CA cert does not include key usage extension");
    earlier versions do not. Setting it on both ends everywhere makes a CA that works
    here work on every supported Python, and fail the same way where it does not.
    docs/security.md's recipe makes certificates that pass.
    """
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


@dataclass(frozen=True)
class ServerSecurity:
    """What a TCP listener demands: TLS 1.3 through context, and token in hello."""

    context: ssl.SSLContext
    token: bytes = field(default=b"", repr=False)  # never in a log line
    client_certs: bool = False  # context requires a certificate from the client CA


def server_security(cert: str, key: str | None, token_file: str,
                    client_ca: str | None = None) -> ServerSecurity:
    """The TLS 1.3 server context and token for TCP listeners.

    cert/key: the controller's certificate chain and private key (PEM; key None if
    it is in cert). client_ca: a CA file; when given, clients must present a
    certificate it signed. Raises SecurityConfigError (one line) if a file cannot be
    read or does not hold what it should.
    """
    token = load_token(token_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    strict_verification(ctx)
    try:
        load_cert_chain(ctx, cert, key)
        if client_ca:
            load_ca(ctx, client_ca, "the client CA")
    except TlsFileError as e:
        raise SecurityConfigError(str(e)) from None
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ServerSecurity(ctx, token, bool(client_ca))


def token_matches(supplied: object, expected: bytes) -> bool:
    """supplied (from a hello) equals the token: compared in constant time."""
    if not isinstance(supplied, str):
        supplied = ""
    return hmac.compare_digest(supplied.encode("utf-8", "surrogatepass"), expected)


@dataclass(frozen=True)
class ClientSecurity:
    """What a client presents on tcp://: a TLS 1.3 context and the token (str)."""

    context: ssl.SSLContext
    token: str = field(repr=False)  # never in a log line or a traceback's locals
    ca: str | None = None  # the CA file given (--tls-ca), for hints; None: the system's


def client_security(*, tls_ca: str | None = None, tls_cert: str | None = None,
                    tls_key: str | None = None, token_file: str | None = None,
                    env: Mapping[str, str] | None = None) -> ClientSecurity | None:
    """A ClientSecurity from options, each falling back to its VIRTFS_* variable.

    None if neither a token file nor any TLS file is given (fine for unix:
    addresses). tls_ca: the CA that signed the controller's certificate (default:
    the system's trusted CAs); tls_cert/tls_key: this client's certificate and key,
    for a controller that requires one. Raises SecurityConfigError (one line, no
    secrets) if a file cannot be loaded or TLS files are given without a token.
    """
    env = os.environ if env is None else env
    opts = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key,
            "token_file": token_file}
    for k, var in SECURITY_ENV.items():
        if not opts[k]:
            opts[k] = env.get(var) or None
    if not any(opts.values()):
        return None
    if not opts["token_file"]:
        raise SecurityConfigError("TLS options need a token too: --token-file or "
                                  "$VIRTFS_TOKEN_FILE")
    if opts["tls_key"] and not opts["tls_cert"]:
        raise SecurityConfigError("--tls-key needs --tls-cert")
    token = load_token(opts["token_file"]).decode("ascii")
    # as ssl.create_default_context makes it (CERT_REQUIRED, host names checked), with
    # the system's CAs only when no CA is given
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    strict_verification(ctx)
    try:
        if opts["tls_ca"]:
            load_ca(ctx, opts["tls_ca"])
        else:
            ctx.load_default_certs()
        if opts["tls_cert"]:
            load_cert_chain(ctx, opts["tls_cert"], opts["tls_key"])
    except TlsFileError as e:
        raise SecurityConfigError(str(e)) from None
    return ClientSecurity(ctx, token, opts["tls_ca"])


def parse_addr(addr: str) -> tuple[str, str]:
    """("unix", PATH) or ("tcp", "HOST:PORT"); ValueError (one line) for anything else."""
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path:
            raise ValueError(f"bad address {addr!r}: empty path")
        return "unix", path
    if addr.startswith("tcp://"):
        split_host_port(addr[6:])
        return "tcp", addr[6:]
    raise ValueError(f"bad address {addr!r}: use unix:PATH or tcp://HOST:PORT")


def split_addrs(text: str) -> list[str]:
    """A controller group's addresses, comma-separated ("unix:/run/c1.sock,unix:/run/c2.sock",
    "tcp://a:7800,tcp://b:7800"; one address is a group of one) -> the list, in order,
    each checked by parse_addr. Raises ValueError (one line) for an empty or bad one."""
    addrs = [a.strip() for a in text.split(",")]
    if not text.strip() or any(not a for a in addrs):
        raise ValueError(f"bad address list {text!r}: addresses separated by commas, "
                         "each unix:PATH or tcp://HOST:PORT")
    for a in addrs:
        parse_addr(a)
    return addrs


def split_host_port(where: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 HOST in brackets: [::1]:7000) -> (host, port), port 0..65535.

    Raises ValueError naming the address.
    """
    host, sep, port = where.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535 or (
            ":" in host and not where.startswith("[")):
        raise ValueError(f"bad address 'tcp://{where}': use tcp://HOST:PORT "
                         "(an IPv6 address in brackets, tcp://[::1]:7000)")
    return host, int(port)


def format_tcp(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A bound TCP socket's name (getsockname()) as a tcp:// address, IPv6 in brackets."""
    host, port = sockname[:2]
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
