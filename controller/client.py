"""open_controller(addr): a multiplexed client used by the agent and vdctl.

``unix:PATH`` needs nothing more (the controller checks the peer's uid).
``tcp://HOST:PORT`` needs a ClientSecurity: TLS 1.3 verified against a CA (the
system's when none is given), HOST checked against the certificate, a client
certificate when the controller asks for one, and the token, sent in ``hello``
inside the TLS channel (never over a Unix socket). Framing, addresses and the
TLS contexts are in ``transport`` (shared with the server).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from . import codec
from . import protocol as P
from .tlsfiles import handshake_hint
from .transport import (
    SECURITY_ENV,
    ClientSecurity,
    FrameError,
    FrameReader,
    SecurityConfigError,
    client_security,
    parse_addr,
    split_addrs,
    split_host_port,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


def add_security_options(parser: argparse._ActionsContainer, default: Any = None) -> None:
    """--tls-ca/--tls-cert/--tls-key/--token-file, for clients (vdctl, virtfs-mount)."""
    parser.add_argument("--tls-ca", metavar="FILE", default=default,
                        help="tcp://: the CA that signed the controller's certificate "
                        "(default $VIRTFS_TLS_CA, else the system's CAs)")
    parser.add_argument("--tls-cert", metavar="FILE", default=default,
                        help="tcp://: this client's certificate, if the controller requires "
                        "one (default $VIRTFS_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="FILE", default=default,
                        help="tcp://: the key of --tls-cert (default $VIRTFS_TLS_KEY)")
    parser.add_argument("--token-file", metavar="FILE", default=default,
                        help="tcp://: a file (mode 0600) holding the controller's shared token "
                        "(default $VIRTFS_TOKEN_FILE)")


def security_from_args(args: argparse.Namespace, addr: str) -> ClientSecurity | None:
    """client_security from parsed add_security_options for a tcp:// addr (where one
    is required); None for unix: (nothing is loaded). Raises SecurityConfigError."""
    if not any(a.startswith("tcp://") for a in addr.split(",")):
        return None
    sec = client_security(**{k: getattr(args, k, None) for k in SECURITY_ENV})
    if sec is None:
        raise SecurityConfigError(f"{addr} needs a token: --token-file or $VIRTFS_TOKEN_FILE "
                                  "(and --tls-ca unless the system trusts the controller's "
                                  "certificate)")
    return sec


TLS_REFUSED = ("the controller ended the TLS session before hello (does it need a client "
               "certificate, --tls-cert and --tls-key, signed by its CA?)")


class ConnectionLost(P.RemoteError):
    def __init__(self, message: str):
        super().__init__("connection_lost", message)


class Refused(ConnectionLost):
    """The controller, or TLS before it, turned this client away: the same attempt
    would be turned away again. A wrong or missing token or a protocol version the
    controller does not speak (code: the controller's, ``unauthorized``,
    ``protocol``), a uid the Unix socket refuses, the controller's certificate not
    trusted (code ``tls``), or the TLS session ended before hello's answer (the
    controller refused our client certificate, or asked for one we lack).
    open_controller raises it; a client that reconnects (the agent) stops on it.
    """

    def __init__(self, message: str, code: str = "refused"):
        P.RemoteError.__init__(self, code, message)


class TermFloor:
    """The highest leader term a client has seen in a reply or push, kept across its
    reconnections (an agent's Session holds one; docs/ha.md "Agents check the term").

    A group's leader stamps every reply and push with its term's token (``"term"``,
    controller/server.py); tokens grow with each new term. A frame stamped with a
    term below the highest seen comes from a leader that has been replaced: the client
    refuses it, and the connection it came on (its caller reconnects and retries, as
    after not_leader). A frame with no term (0: a controller that runs alone, or a
    standby's not_leader) is taken as before.
    """

    def __init__(self) -> None:
        self.highest = 0
        self.refused = 0  # frames refused

    def admit(self, term: object) -> bool:
        """Whether a frame stamped term (None: no stamp) may be acted on; a higher term
        raises the floor. False for a term below it, or one that is not an int >= 0."""
        if term is None:
            term = 0
        if not isinstance(term, int) or isinstance(term, bool) or term < 0:
            self.refused += 1
            return False
        if term == 0:
            return True
        if term < self.highest:
            self.refused += 1
            return False
        self.highest = term
        return True


class Client:
    def __init__(self, stream: trio.abc.Stream, on_push: Callable[[dict[str, Any]], Any] | None,
                 terms: TermFloor | None = None):
        """terms: refuse frames of an older leader term than it has seen (agents);
        None: no check (vdctl)."""
        self.stream = stream
        self.on_push = on_push
        self.terms = terms
        self._next_id = 1
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._send_lock = trio.Lock()
        self.closed = False
        self.close_reason = ""
        self.closed_event = trio.Event()  # set with closed: lets a holder notice at once
        self.refused = False  # cut off before hello's answer, by a refusal (see Refused)
        self.addr = ""  # the controller's address it reached (one of a group's)

    def _before_hello(self) -> bool:
        """A TLS stream cut while hello is the only request: the TLS 1.3 client
        certificate check (done after the client's handshake) failed, most likely."""
        return isinstance(self.stream, trio.SSLStream) and self._next_id <= 2

    async def _reader(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        reader = FrameReader(self.stream, codec.MAX_RESPONSE_FRAME)
        task_status.started()
        try:
            while True:
                msg = await reader.read()
                if msg is None:
                    self.close_reason = "the controller closed the connection"
                    break
                if not isinstance(msg, dict):
                    continue
                if self.terms is not None and not self.terms.admit(msg.get("term")):
                    # a deposed leader's: act on none of it, and leave this link (every
                    # waiting call gets ConnectionLost; the caller reconnects and retries)
                    self.close_reason = (f"a reply or push of leader term "
                                         f"{msg.get('term')!r}, older than term "
                                         f"{self.terms.highest} seen: not the leader")
                    log.warning("controller at %s: %s; reconnecting", self.addr or "?",
                                self.close_reason)
                    break
                if "push" in msg:
                    if self.on_push is not None:
                        await self.on_push(msg)
                    continue
                rid = msg.get("id")
                chan = self._waiting.pop(rid, None) if isinstance(rid, int) else None
                if chan is not None:
                    chan.send_nowait(msg)
                elif not msg.get("ok", True):
                    err = msg.get("error") or {}
                    self.close_reason = str(err.get("message", "protocol error"))
                    # an error for no request, before hello's answer: the controller's
                    # refusal of this peer (a uid the Unix socket does not serve)
                    self.refused = self.refused or self._next_id <= 2
        except (FrameError, codec.CodecError, trio.BrokenResourceError,
                trio.ClosedResourceError) as e:
            # a TLS alert (certificate required, unknown CA) is the cause of a broken stream
            cause = e.__cause__ if isinstance(e.__cause__, ssl.SSLError) else None
            if self._before_hello() and not isinstance(e, FrameError | codec.CodecError):
                self.close_reason = TLS_REFUSED
                self.refused = True
            elif cause is not None:
                self.close_reason = f"TLS: {cause.reason or cause}"
            else:
                self.close_reason = str(e) or e.__class__.__name__
        finally:
            self.closed = True
            self.closed_event.set()
            for chan in self._waiting.values():
                chan.close()
            self._waiting.clear()

    async def call(self, op: str, timeout: float | None = DEFAULT_TIMEOUT, **args: Any) -> Any:
        """One request/reply; RemoteError on an error reply, ConnectionLost if cut."""
        if self.closed:
            raise ConnectionLost(self.close_reason or "not connected")
        rid = self._next_id
        self._next_id += 1
        try:
            frame = codec.wire_frame({"id": rid, "op": op, "args": args})
        except (TypeError, ValueError, OverflowError) as e:
            raise P.invalid(f"{op}: arguments cannot be encoded: {e}") from None
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[rid] = send
        with trio.fail_after(timeout if timeout is not None else math.inf):
            try:
                async with self._send_lock:
                    await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._waiting.pop(rid, None)
                if self._before_hello():
                    self.refused = True
                    raise Refused(TLS_REFUSED, "tls") from None
                raise ConnectionLost(f"cannot send to the controller: {e}") from None
            try:
                msg = await recv.receive()
            except trio.EndOfChannel:
                raise ConnectionLost(self.close_reason or "connection lost") from None
            finally:
                self._waiting.pop(rid, None)
        if msg.get("ok"):
            return msg.get("result")
        err = msg.get("error") or {}
        leader = err.get("leader")
        raise P.RemoteError(str(err.get("code", P.E_INTERNAL)),
                            str(err.get("message", "unknown error")),
                            leader if isinstance(leader, str) else None)


async def connect_stream(addr: str, security: ClientSecurity | None = None) -> trio.abc.Stream:
    """A connected stream to addr: a Unix socket, or TCP with a completed TLS handshake.

    Raises OSError if the connection fails, Refused if the TLS handshake fails
    verification (certificate not trusted, wrong host name: the message says what to
    do), ConnectionLost if it fails otherwise or tcp:// comes without security.
    """
    kind, where = parse_addr(addr)
    if kind == "unix":
        return await trio.open_unix_socket(where)
    if security is None:
        raise ConnectionLost(f"{addr} needs TLS and a token (--token-file, --tls-ca)")
    host, port = split_host_port(where)
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, security.context, server_hostname=host)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as e:
        await trio.aclose_forcefully(tls)
        cause = e.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = str(cause.verify_message or cause.reason or cause)
            hint = handshake_hint(why, security.ca)
            raise Refused(f"TLS handshake with {addr} failed: {why}"
                          f"{'; ' + hint if hint else ''}", "tls") from None
        other = getattr(cause, "reason", None) or cause or e
        raise ConnectionLost(f"TLS handshake with {addr} failed: {other}") from None
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


def single_leaf(eg: BaseExceptionGroup) -> BaseException | None:
    """The one real exception inside a (nested) group, ignoring cancellations."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        elif not isinstance(e, trio.Cancelled):
            leaves.append(e)

    walk(eg)
    return leaves[0] if len(leaves) == 1 else None


@asynccontextmanager
async def open_controller(addr: str, *, role: str = "admin", name: str = "",
                          on_push: Callable[[dict[str, Any]], Any] | None = None,
                          timeout: float = DEFAULT_TIMEOUT,
                          security: ClientSecurity | None = None,
                          terms: TermFloor | None = None) -> AsyncIterator[Client]:
    """A Client connected to the controller at addr and past hello (as role), for the
    block's duration; its ``addr`` is the address it reached.

    addr: one address, or a group's addresses separated by commas (docs/ha.md). They
    are tried in order; a controller that does not lead its group answers hello with
    E_NOT_LEADER naming the leader, which is tried next (at most MAX_REDIRECTS times).
    security: required for tcp:// (its token goes in hello); ignored for unix:.
    terms: the caller's TermFloor (an agent's): frames of an older leader term are
    refused, hello's answer too (that address then counts as not serving).
    Raises ConnectionLost if no controller can be reached (a slow connect or TLS
    handshake too) or one cuts us off, naming each address's error; Refused (a
    ConnectionLost; code unauthorized on a wrong token) if one turned us away and no
    other let us in; trio.TooSlowError if hello gets no answer within timeout (per
    address; at most GROUP_HELLO_TIMEOUT when addr lists several).
    """
    addrs = split_addrs(addr)
    if len(addrs) > 1:  # a group: a member that hangs (paused) must not hold us long
        timeout = min(timeout, GROUP_HELLO_TIMEOUT)
    tried: list[str] = []
    failures: list[tuple[str, ConnectionLost]] = []
    queue = list(addrs)
    redirects = 0
    while queue:
        a = queue.pop(0)
        tried.append(a)
        stack = AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                _open_one(a, role=role, name=name, on_push=on_push, timeout=timeout,
                          security=security, terms=terms))
        except NotLeader as e:
            failures.append((a, e))
            if e.leader and e.leader not in tried and redirects < MAX_REDIRECTS:
                redirects += 1
                if e.leader in queue:
                    queue.remove(e.leader)
                queue.insert(0, e.leader)
            continue
        except (ConnectionLost, trio.TooSlowError) as e:
            if len(addrs) == 1 and not redirects:
                raise
            failures.append((a, e if isinstance(e, ConnectionLost) else ConnectionLost(
                f"no answer to hello from the controller at {a} within {timeout:g} s")))
            continue
        async with stack:
            yield client
        return
    raise _no_leader(failures)


MAX_REDIRECTS = 8  # "the leader is X" followed at most this often per open_controller
# s: connect + hello at each address of a group's list (a healthy controller answers hello
# in milliseconds; a paused or partitioned one would hold a client its whole timeout)
GROUP_HELLO_TIMEOUT = 5.0


class NotLeader(ConnectionLost):
    """A controller of a group that does not lead it answered hello (E_NOT_LEADER);
    leader: the leader's address it named, or None."""

    def __init__(self, message: str, leader: str | None):
        P.RemoteError.__init__(self, P.E_NOT_LEADER, message, leader)


def _no_leader(failures: list[tuple[str, ConnectionLost]]) -> ConnectionLost:
    """The error of a group none of whose addresses served: a Refused if one refused us
    (the same credentials will not do better), else ConnectionLost naming each."""
    for _a, e in failures:
        if isinstance(e, Refused):
            return e
    text = "; ".join(e.message if a in e.message else f"{a}: {e.message}"
                     for a, e in failures)
    return NoLeader(f"no leader among the controllers: {text}",
                    answered=any(isinstance(e, NotLeader) for _a, e in failures))


class NoLeader(ConnectionLost):
    """No address of a group served (open_controller); answered: whether a member
    answered hello ("not the leader"), so the group is there, only without a leader
    yet (or one we did not reach)."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


@asynccontextmanager
async def _open_one(addr: str, *, role: str, name: str,
                    on_push: Callable[[dict[str, Any]], Any] | None, timeout: float,
                    security: ClientSecurity | None,
                    terms: TermFloor | None = None) -> AsyncIterator[Client]:
    """open_controller for one address; NotLeader if it does not lead its group."""
    try:
        with trio.fail_after(timeout):
            stream = await connect_stream(addr, security)
    except (OSError, trio.TooSlowError) as e:
        raise ConnectionLost(f"cannot connect to the controller at {addr}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
    client = Client(stream, on_push, terms)
    client.addr = addr
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._reader)
            extra = {"token": security.token} if security is not None and (
                addr.startswith("tcp://")) else {}  # never over a Unix socket
            try:
                await client.call("hello", timeout=timeout, version=P.PROTOCOL_VERSION,
                                  role=role, name=name or f"pid-{os.getpid()}", **extra)
            except Refused:
                raise
            except ConnectionLost as e:
                if client.refused:
                    raise Refused(e.message) from None
                raise
            except P.RemoteError as e:  # an error answer to hello: a refusal ...
                if e.code == P.E_NOT_LEADER:  # ... or "ask the leader"
                    raise NotLeader(e.message, e.leader) from None
                raise Refused(e.message, e.code) from None
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        leaf = single_leaf(eg)
        if leaf is None:
            raise
        raise leaf from None
    finally:
        await stream.aclose()
