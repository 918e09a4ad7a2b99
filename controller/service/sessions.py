"""Agent sessions: register, heartbeat, ack, bye, ls, I/O error reports."""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import protocol as P
from ..roster import valid_token
from .context import Caller, Context
from .movement import Movement

log = logging.getLogger(__name__)


class Sessions:
    """Agents' sessions with the controller."""

    def __init__(self, ctx: Context, movement: Movement):
        self.ctx = ctx
        self.state = ctx.state
        self.agents = ctx.agents
        self.movement = movement

    async def agent_register(self, name: str, host: str, mount: str, conn: Caller,
                             token: str = "") -> dict[str, object]:
        """Register the agent on conn; its id and lease (seconds). Pushes go out on
        conn; the agent is forgotten (its lease waited out) when conn closes. token:
        the agent process's session token ("": an agent that sends none), listed in the
        roster durably before the answer (AgentRegistry.enroll); E_INVALID if it is not
        16-64 lower-case hex digits, E_IO if the roster cannot be written."""
        if conn.agent is not None:
            raise P.RemoteError(P.E_PROTOCOL, "already registered")
        if token and not valid_token(token):
            raise P.RemoteError(P.E_INVALID, "agent.register: token must be 16 to 64 "
                                             "lower-case hex digits")

        async def send(msg: dict[str, Any]) -> None:
            await conn.send(msg)
            if conn.closed:
                raise ConnectionError("connection closed")

        try:
            agent = await self.agents.enroll(name, host, mount, send, kick=conn.abort,
                                             token=token)
        except OSError as e:
            raise P.RemoteError(P.E_IO, f"cannot list the agent in the roster: {e}") from e
        conn.agent = agent
        conn.on_close.append(lambda: self.agents.disconnected(agent))
        return {"agent_id": agent.id, "lease": self.agents.lease}

    async def agent_heartbeat(self, conn: Caller) -> dict[str, object]:
        """Renew the caller's lease; the epoch of every disk it has open (None: gone)."""
        a = self.ctx.agent(conn)
        self.agents.renew(a)
        self.agents.current(a)  # it heartbeats only once its tables are reloaded
        epochs: dict[str, int | None] = {}
        for ref in a.opens.values():
            d = ref.disk
            # None: the disk is gone (the agent then uses none of its entries)
            epochs[d.name] = d.epoch if self.state.disks.get(d.name) is d else None
        return {"lease": self.agents.lease, "epochs": epochs}

    async def agent_bye(self, conn: Caller) -> None:
        """A clean agent exit: it uses no entry any more, so its lease need not be waited out."""
        a = self.ctx.agent(conn)
        self.agents.remove(a)
        conn.agent = None

    async def agent_ack(self, pid: int) -> bool:
        """An agent applied push pid; False if nobody waits for it any more."""
        return self.agents.ack(pid)

    async def agent_ls(self) -> list[dict[str, object]]:
        """The registered agents, as vdctl shows them."""
        return self.agents.to_list()

    async def io_error(self, name: str, lun: int, offset: int, message: str) -> None:
        """An agent's report of a container I/O error: logged; the container turns
        suspect."""
        c = self.state.luns.get(lun)
        log.error("agent reports an I/O error on disk %r, container %s at %d: %s",
                  name, c.name if c else lun, offset, message)
        if c is not None:
            # suspect until someone fails or restores it (vdctl container fail|restore)
            self.movement.suspect(lun, f"{time.strftime('%Y-%m-%d %H:%M:%S')} disk "
                                       f"{name!r} at {offset}: {message}")
