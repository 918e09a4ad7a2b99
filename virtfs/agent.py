"""The agent's session with the controller: connect, register, heartbeat, pushes.

The session reconnects forever with backoff. While connected it renews the
lease every third of the lease period; ``lease_until`` (trio clock) is when
cached entries stop being trusted if no renewal arrives. Calls made while the
controller is away wait (up to their deadline) for the session to come back.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from controller.client import (
    Client,
    ConnectionLost,
    NoLeader,
    Refused,
    TermFloor,
    open_controller,
)
from controller.protocol import E_INVALID, E_NOT_LEADER, RemoteError
from controller.transport import ClientSecurity, split_addrs

from .outage import OutageLog

log = logging.getLogger(__name__)

# refusals in a row before the first registration that end the session: one more than
# one, as a controller stopping mid-handshake looks like a refusal of our certificate
REFUSALS_TO_STOP = 2

PushHandler = Callable[[dict[str, Any]], Awaitable[None]]
ReconnectHandler = Callable[[Client], Awaitable[None]]


class ControllerUnavailable(Exception):
    """No controller answered within the deadline."""


class Session:
    def __init__(self, addr: str, mount: str, *, call_timeout: float = 30.0,
                 security: ClientSecurity | None = None):
        self.addr = addr
        self.security = security  # TLS context and token, for a tcp:// controller
        self.mount = mount
        self.call_timeout = call_timeout
        self.client: Client | None = None
        self._ack_client: Client | None = None
        self.agent_id: int | None = None
        self.lease = 10.0
        self.lease_until = -1.0
        self._up = trio.Event()
        self._renewed = trio.Event()
        self.on_push: PushHandler | None = None
        self.on_reconnect: ReconnectHandler | None = None
        self.on_renew: Callable[[], None] | None = None  # after each renewal (cfast.py)
        self.reconnects = 0
        self._nursery: trio.Nursery | None = None
        self.outages = OutageLog(f"the controller at {addr}")  # when to say it is away
        self.last_error = ""  # why the last attempt failed (for the mount's messages)
        self.lost_addr: str | None = None  # the address whose connection we lost last
        self.lost_at = -1.0  # when (trio's clock); skip_lost: leave lost_addr out for now
        self.skip_lost = False
        # the highest leader term seen, across reconnections: replies and pushes of an
        # older term (a deposed leader's) are refused (docs/ha.md)
        self.terms = TermFloor()
        # this process's session token, sent at every registration: a controller that
        # restarts knows from its roster whether every session holding one of its
        # leases is back, and then ends its grace early (docs/fencing.md)
        self.token: str | None = secrets.token_hex(16)

    def lease_valid(self) -> bool:
        return trio.current_time() < self.lease_until

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a registered connection; task_status.started() after the first one.

        Before the first registration, a refusal (client.Refused: a wrong token, a
        certificate either side does not trust, ...) met REFUSALS_TO_STOP times in a row
        ends it with that Refused: the same credentials will not do better, and the
        mount should say why at once rather than wait out its connect timeout. After
        it, the session never gives up (an outage is logged by OutageLog's rule).
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            refusal = await self._keep_connected(task_status)
            nursery.cancel_scope.cancel()
        raise refusal

    async def _keep_connected(self, task_status: Any) -> Refused:
        """Reconnect for ever; returns only a refusal before the first registration."""
        started = False
        backoff = 0.05
        refusals = 0
        while True:
            registrations = self.reconnects
            try:
                await self._connected_session(task_status if not started else None)
            except Refused as e:
                refusals += 1
                if not started and refusals >= REFUSALS_TO_STOP:
                    return e
                self._outage(e)
            except (ConnectionLost, OSError, trio.TooSlowError, RemoteError) as e:
                refusals = 0
                self._outage(e)
                if self.skip_lost and not (isinstance(e, NoLeader) and e.answered):
                    self.skip_lost = False  # no other member answered: try it too
            except Exception:
                # a bug, not an outage: say so loudly, but keep the mount's session
                log.exception("session with the controller at %s failed; reconnecting",
                              self.addr)
            finally:
                # _connected_session only ever ends by raising: a registration counts,
                # so task_status.started() is never called a second time
                started = started or self.reconnects > 0
                self.client = None
                if self._up.is_set():
                    self._up = trio.Event()
            if self.reconnects > registrations:
                backoff = 0.05  # we were registered: this is a new outage
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _outage(self, e: BaseException) -> None:
        """Note a failed attempt or a lost connection; log it as OutageLog says."""
        reason = getattr(e, "message", None) or str(e) or e.__class__.__name__
        self.last_error = reason
        if self.reconnects == 0:
            return  # not registered yet: the mount says why if it gives up
        line = self.outages.failed(trio.current_time(), reason)
        if line is not None:
            log.warning("%s", line)

    async def _connected_session(self, task_status: Any) -> None:
        async def push(msg: dict[str, Any]) -> None:
            # never block the reader: a push handler may need replies to finish
            assert self._nursery is not None
            self._nursery.start_soon(self._handle_push, msg)

        async with open_controller(self.addrs_to_try(), role="agent",
                                   name=f"agent@{socket.gethostname()}",
                                   on_push=push, timeout=5.0,
                                   security=self.security, terms=self.terms) as client:
            self._ack_client = client  # pushes may arrive (and need acks) during a reload
            sent = trio.current_time()
            reg = await self._register(client)
            self.agent_id = reg["agent_id"]
            self.lease = float(reg["lease"])
            first = self.reconnects == 0
            self.reconnects += 1
            away = self.outages.recovered(trio.current_time())
            log.info("registered with the controller at %s as agent %d (lease %.1f s)%s",
                     client.addr, self.agent_id, self.lease,
                     "" if away is None else f", after {away:.1f} s without it")
            if not first and self.on_reconnect is not None:
                # reload every table first: until then the old lease (if any is left)
                # is all the cached entries may be used under
                await self.on_reconnect(client)
            self.client = client
            self._renew(sent)
            self._up.set()
            if task_status is not None:
                task_status.started()
            try:
                # after a reload, heartbeat at once: that tells the controller every
                # table we use is its own (it may end a restart's grace on it)
                await self._heartbeats(client, now=not first)
            finally:
                self.lost_addr, self.lost_at, self.skip_lost = (
                    client.addr, trio.current_time(), True)

    def addrs_to_try(self) -> str:
        """The addresses to (re)connect to, in order: a group's list (docs/ha.md) with
        the member whose connection we lost last moved to the end, or left out while
        skip_lost says so (the others answer, within a lease of the loss). A leader cut
        off from the network answers neither a heartbeat nor a connect: each attempt
        that tried it would cost a hello timeout (5 s) before the new leader, past a
        short lease. If it still leads, the others name it, and the client goes there
        all the same."""
        addrs = split_addrs(self.addr)
        if self.lost_addr in addrs and len(addrs) > 1:
            addrs.remove(self.lost_addr)
            if not (self.skip_lost and trio.current_time() < self.lost_at + self.lease):
                addrs.append(self.lost_addr)
        return ",".join(addrs)

    async def _register(self, client: Client) -> Any:
        """agent.register, with the token unless the controller is of a version without
        (it refuses the argument: then never again with it)."""
        args: dict[str, Any] = {"name": f"{socket.gethostname()}:{self.mount}",
                                "host": socket.gethostname(), "mount": self.mount}
        if self.token is not None:
            try:
                return await client.call("agent.register", token=self.token, **args)
            except RemoteError as e:
                if e.code != E_INVALID or "token" not in str(e):
                    raise
                log.info("the controller at %s takes no session token", client.addr)
                self.token = None
        return await client.call("agent.register", **args)

    async def _heartbeats(self, client: Client, now: bool = False) -> None:
        """Renew the lease for ever (the first heartbeat at once if now); raises when
        the connection is lost."""
        while True:
            # wake early when the connection drops, to reconnect at once rather than
            # at the next heartbeat (calls meanwhile would fail against the dead link)
            with trio.move_on_after(0 if now else self.lease / 3):
                await client.closed_event.wait()
            now = False
            if client.closed:
                raise ConnectionLost(client.close_reason or "connection lost")
            sent = trio.current_time()
            hb = await client.call("agent.heartbeat", timeout=self.lease / 2)
            self._renew(sent)
            if hb.get("epochs"):
                # handled like a push, in the background: a slow table reload must
                # never hold up the next heartbeat (the lease would run out)
                assert self._nursery is not None
                self._nursery.start_soon(self._handle_push,
                                         {"push": "epochs", "epochs": hb["epochs"]})

    async def _handle_push(self, msg: dict[str, Any]) -> None:
        try:
            if self.on_push is not None:
                await self.on_push(msg)
            pid = msg.get("pid")
            client = self._ack_client
            if isinstance(pid, int) and client is not None:
                await client.call("agent.ack", timeout=self.lease, pid=pid)
        except (ConnectionLost, RemoteError, trio.TooSlowError) as e:
            log.info("could not finish push %s: %s", msg.get("push"), e)
        except Exception:
            log.exception("push handler failed for %s", msg.get("push"))

    def _renew(self, sent: float) -> None:
        self.lease_until = sent + self.lease
        if self.on_renew is not None:
            self.on_renew()
        self._renewed.set()
        self._renewed = trio.Event()

    async def wait_lease(self, deadline: float) -> None:
        """Wait for the lease to be renewed (by a heartbeat or a re-registration)."""
        while not self.lease_valid():
            with trio.move_on_at(deadline):
                await self._renewed.wait()
            if not self.lease_valid() and trio.current_time() >= deadline:
                raise ControllerUnavailable("the lease was not renewed in time")

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a background task for the session's life (dropped if it is not running)."""
        if self._nursery is not None:
            self._nursery.start_soon(fn)

    async def wait_up(self, deadline: float) -> Client:
        while self.client is None:
            with trio.move_on_at(deadline):
                await self._up.wait()
            if self.client is None and trio.current_time() >= deadline:
                raise ControllerUnavailable(f"no controller at {self.addr}")
        return self.client

    async def call(self, op: str, *, timeout: float | None = None, retry: bool = True,
                   **args: Any) -> Any:
        """Call op, waiting for (and, if retry, retrying across) reconnections until timeout."""
        deadline = trio.current_time() + (timeout if timeout is not None else self.call_timeout)
        while True:
            client = await self.wait_up(deadline)
            try:
                return await client.call(op, timeout=max(0.1, deadline - trio.current_time()),
                                         **args)
            except ConnectionLost:
                if not retry or trio.current_time() >= deadline:
                    raise ControllerUnavailable(f"lost the controller during {op}") from None
                await trio.sleep(0.05)
            except RemoteError as e:
                if e.code != E_NOT_LEADER:
                    raise
                # a group's leader whose term ended while it worked on op (docs/ha.md):
                # nothing of op counts there; drop the link and ask the new leader
                if not retry or trio.current_time() >= deadline:
                    raise ControllerUnavailable(f"the leader changed during {op}") from None
                if client is self.client:
                    await client.stream.aclose()
                await trio.sleep(0.05)
            except trio.TooSlowError:
                raise ControllerUnavailable(f"the controller did not answer {op} in time"
                                            ) from None
