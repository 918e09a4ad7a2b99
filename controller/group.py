"""A controller as a member of a group on etcd (issue 14, docs/ha.md).

``run_member`` is what ``virtfs-controller --etcd URL`` runs. The member listens on its
own ``--listen`` addresses from the start, and campaigns for the group's leader key
(controller/election.py):

- while another member leads, it is a **standby**: ``hello`` is answered
  ``not_leader``, naming the leader's address (``--advertise``), so agents and vdctl go
  there (controller/client.py);
- once elected, it opens the controller service on the group's shared state dir, as a
  restart does (replay, resume jobs and moves, wait out agents' leases only where it
  must), with the journal fenced by the term's token (controller/journal.py), and
  serves;
- when its term ends (its etcd lease lapsed, etcd said so, or a fenced write was
  refused), the service is cancelled at once, every connection is closed, nothing more
  is written (no checkpoint, no marker removed), and it campaigns again as a standby.

Pure wiring: the election, the service and the server are their own modules'.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from . import protocol as P
from .election import DEFAULT_TTL, Election, Leader, LeadershipLost, Term, open_election
from .etcd import EtcdError, EtcdSecurity, open_etcd

log = logging.getLogger(__name__)

DEFAULT_GROUP = "default"
PREFIX_ROOT = "/virtfs/"


@dataclass(frozen=True)
class GroupConfig:
    """How a controller joins its group.

    etcd: the cluster's client URLs, comma-separated; group: the group's name (its keys
    live under /virtfs/GROUP/ in etcd); member_id: this member's name in the group
    (default HOST:PID... see member_name); advertise: the address clients should use to
    reach this member (what a standby names as the leader's); etcd_security: etcd's own
    TLS and credentials; ttl: the leader's etcd lease, seconds (a failover starts
    within it)."""

    etcd: str
    advertise: str
    group: str = DEFAULT_GROUP
    member_id: str = ""
    etcd_security: EtcdSecurity | None = None
    ttl: int = DEFAULT_TTL

    @property
    def prefix(self) -> str:
        return PREFIX_ROOT + self.group


def member_name(advertise: str) -> str:
    """A member's default id: the host's name and the address it advertises."""
    return f"{socket.gethostname()}/{advertise}"


class Member:
    """A member's view of the group for the server: whether it leads, who does, and the
    service to dispatch to while it leads."""

    def __init__(self, advertise: str) -> None:
        self.advertise = advertise
        self.leader: Leader | None = None  # who leads, as the last observation said
        self.dispatcher: Callable[[str, dict[str, Any], Any], Awaitable[Any]] | None = None
        self.term: GroupTerm | None = None  # ours, while we lead and serve

    def serving(self, term: GroupTerm,
                dispatcher: Callable[[str, dict[str, Any], Any], Awaitable[Any]]) -> None:
        """We lead in term and serve through dispatcher from now on."""
        self.term, self.dispatcher = term, dispatcher

    def standby(self) -> None:
        self.term = self.dispatcher = None

    def leadership(self) -> tuple[bool, str | None]:
        """For Server(leader=...): (we lead and serve, the leader's address)."""
        if self.dispatcher is not None and self.term is not None and self.term.leads():
            return True, self.advertise
        return False, (self.leader.address or None) if self.leader is not None else None

    async def dispatch(self, op: str, args: dict[str, Any], conn: Any) -> Any:
        """The server's dispatch: the service's while we lead, else not_leader. Each
        request is checked against the term first (GroupTerm.leads: etcd's word, or our
        own count of the lease), so a leader that was paused past its lease answers
        nothing, not even a heartbeat that would renew an agent's lease, from the moment
        it runs again (its term's end then closes every connection)."""
        d, t = self.dispatcher, self.term
        if d is None or t is None or not t.leads():
            raise P.not_leader(self.leadership()[1])
        return await d(op, args, conn)

    async def follow(self, election: Election) -> None:
        """Keep self.leader current (an etcd watch on the leader key), for ever."""
        while True:
            try:
                async with election.observe() as leaders:
                    async for leader in leaders:
                        if leader != self.leader:
                            log.info("group leader: %s", leader or "none")
                        self.leader = leader
            except EtcdError as e:
                log.warning("watching the group's leader: %s; again in 1 s", e)
                await trio.sleep(1)


@asynccontextmanager
async def open_group(cfg: GroupConfig) -> AsyncIterator[tuple[Election, Member]]:
    """The etcd client, this member's Election and its Member (whose follow() runs in
    the background) for the block's duration."""
    member_id = cfg.member_id or member_name(cfg.advertise)
    async with open_etcd(cfg.etcd, security=cfg.etcd_security) as etcd, \
            open_election(etcd, cfg.prefix, member_id=member_id, address=cfg.advertise,
                          ttl=cfg.ttl) as election:
        member = Member(cfg.advertise)
        async with trio.open_nursery() as n:
            n.start_soon(member.follow, election)
            yield election, member
            n.cancel_scope.cancel()


@dataclass(frozen=True)
class GroupTerm:
    """What a leader's service needs of the group: the election (for fenced writes,
    Election.guarded_put) and the term it serves in (Term: token, whether it ended)."""

    election: Election
    term: Term

    def leads(self) -> bool:
        """The term has not ended, by what we know (Term.check: etcd's word, or our own
        count of the lease); False means: write nothing more."""
        try:
            self.term.check()
        except LeadershipLost:
            return False
        return True


LeaderBody = Callable[[GroupTerm], Awaitable[None]]


async def lead_for_ever(election: Election, member: Member, serve: LeaderBody,
                        on_lost: Callable[[], int]) -> None:
    """Campaign; while we lead, run serve(GroupTerm) (it calls member.serving once it
    serves); when the term ends, go back to standby, call on_lost() (closes every
    connection) and campaign again. Returns only if serve returns (a clean stop)."""
    while True:
        lost: LeadershipLost | None = None
        try:
            async with election.lead() as term:
                log.info("this member leads group %s (term %d)", election.key, term.token)
                try:
                    await serve(GroupTerm(election, term))
                finally:
                    member.standby()
                return
        except LeadershipLost as e:
            lost = e
        member.standby()
        n = on_lost()
        log.warning("stepped down: %s; %d connection(s) closed; campaigning again as a "
                    "standby", lost, n)

