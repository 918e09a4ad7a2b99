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

import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from . import protocol as P
from .election import DEFAULT_TTL, Election, Leader, LeadershipLost, Term, open_election
from .etcd import EtcdError, EtcdSecurity, open_etcd
from .grouprecovery import GroupRecovery, read_head
from .standby import Standby
from .state import State

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
    """A member of the group, for its server: whether it leads, who does, the service to
    dispatch to while it leads, its record in the group's roster, and the group's own
    ops (its part of ``status``, ``group.step_down``)."""

    def __init__(self, election: Election, cfg: GroupConfig) -> None:
        self.election = election
        self.etcd = election.client
        self.cfg = cfg
        self.advertise = cfg.advertise
        self.leader: Leader | None = None  # who leads, as the last observation said
        self.dispatcher: Callable[[str, dict[str, Any], Any], Awaitable[Any]] | None = None
        self.term: GroupTerm | None = None  # ours, while we lead and serve
        self.since = time.time()  # in its present role since (Unix time)
        self.stepping_down = trio.Event()  # set by group.step_down: resign now
        self.state_dir = ""  # the shared state dir (set by the daemon)
        self.hot: Standby | None = None  # the hot standby's state, while a standby
        self.durable_seq: Callable[[], int] | None = None  # the leader's journal's
        self.elections_won = 0  # terms this member has led (for its metrics)
        self.step_downs = 0  # terms of its that ended (lost, fenced or handed over)
        self._roster_changed = trio.Event()

    @property
    def role(self) -> str:
        return "leader" if self.dispatcher is not None else "standby"

    def serving(self, term: GroupTerm,
                dispatcher: Callable[[str, dict[str, Any], Any], Awaitable[Any]],
                durable_seq: Callable[[], int] | None = None) -> None:
        """We lead in term and serve through dispatcher from now on; durable_seq: the
        last seq our journal has made durable (the head's, for the metrics)."""
        self.term, self.dispatcher, self.durable_seq = term, dispatcher, durable_seq
        self._changed()

    def standby(self) -> None:
        self.term = self.dispatcher = self.durable_seq = None
        self._changed()

    def _changed(self) -> None:
        self.since = time.time()
        self._roster_changed.set()

    def term_token(self) -> int:
        """For Server(term=...): the token of the term we serve in, 0 while a standby."""
        return self.term.term.token if self.term is not None else 0

    def leadership(self) -> tuple[bool, str | None]:
        """For Server(leader=...): (we lead and serve, the leader's address).

        A member that does not lead never names itself: after its term ended, its
        watch of the leader key may still show its own term (cut off from etcd, it
        hears of no change), and "the leader is <me>" would send clients in a loop."""
        if self.dispatcher is not None and self.term is not None and self.term.leads():
            return True, self.advertise
        if self.leader is None or self.leader.address == self.advertise:
            return False, None
        return False, self.leader.address or None

    async def dispatch(self, op: str, args: dict[str, Any], conn: Any) -> Any:
        """The server's dispatch: the service's while we lead, else not_leader. Each
        request is checked against the term first (GroupTerm.leads: etcd's word, or our
        own count of the lease), so a leader that was paused past its lease answers
        nothing, not even a heartbeat that would renew an agent's lease, from the moment
        it runs again (its term's end then closes every connection). An op that fails
        because the term ended under it is answered not_leader too (agents then retry at
        the new leader, virtfs/agent.py)."""
        d, t = self.dispatcher, self.term
        if d is None or t is None or not t.leads():
            raise P.not_leader(self.leadership()[1])
        if op == "group.step_down":
            return await self.step_down(args.get("to"))
        try:
            result = await d(op, args, conn)
        except Exception as e:
            if self.term is t and t.leads():
                raise
            # the term ended while op was under way (its commit was cancelled or fenced):
            # nothing of it counts here; the client asks the new leader (agents retry)
            log.info("%s: the term ended meanwhile (%s); answered not_leader", op,
                     type(e).__name__)
            raise P.not_leader(self.leadership()[1]) from None
        if op == "status" and isinstance(result, dict):
            result["group"] = await self.group_status()
        return result

    # ------------------------------------------------------------ the roster
    @property
    def _members(self) -> str:
        return self.cfg.prefix + "/members/"

    async def roster(self) -> None:
        """For ever: keep this member's record PREFIX/members/ID (JSON: id, address,
        role, since) in etcd, on a lease of its own renewed every third of the TTL, so
        it goes when the member dies; rewritten when the role changes."""
        key = self._members + self.election.member_id
        while True:
            try:
                lease = (await self.etcd.lease_grant(self.cfg.ttl)).id
                while True:
                    self._roster_changed = trio.Event()
                    hot = self.hot if self.role == "standby" else None
                    await self.etcd.put(key, json.dumps({
                        "id": self.election.member_id, "address": self.advertise,
                        "role": self.role, "since": round(self.since, 3),
                        "seq": hot.seq if hot is not None else None}), lease=lease)
                    with trio.move_on_after(self.cfg.ttl / 3):
                        await self._roster_changed.wait()
                    await self.etcd.lease_keepalive(lease)
            except EtcdError as e:
                log.info("group roster: %s; again in 1 s", e)
                await trio.sleep(1)

    async def group_status(self) -> dict[str, Any]:
        """What status shows of the group: its name, the leader and its term, the
        journal's durable head in etcd (the term that moved it last, and its seq), and
        each member's record (id, address, role, since)."""
        r = await self.etcd.get_prefix(self._members)
        members = []
        for kv in r.kvs:
            try:
                m = json.loads(kv.value)
            except ValueError:
                continue
            if isinstance(m, dict):
                members.append(m)
        members.sort(key=lambda m: str(m.get("id")))
        leader = self.leader
        head = await read_head(self.etcd, self.cfg.prefix)
        return {"name": self.cfg.group, "etcd": self.cfg.etcd,
                "leader": leader.id if leader else None,
                "term": self.term.term.token if self.term else None,
                "head": None if head is None else {"term": head.term, "seq": head.seq},
                "members": members}

    # ------------------------------------------------------------ handing over
    @property
    def _handover(self) -> str:
        return self.cfg.prefix + "/handover"

    async def step_down(self, to: object) -> dict[str, Any]:
        """group.step_down: resign so that another member leads (to: that member's id,
        or None for any standby). The standbys other than `to` hold back their
        campaigns while PREFIX/handover (written fenced by our token, on a lease of two
        TTLs) names it. Raises RemoteError E_NOT_FOUND for an unknown member, E_INVALID
        for ourselves or when no standby runs."""
        status = await self.group_status()
        standbys = [m["id"] for m in status["members"] if m.get("role") == "standby"]
        if to is not None:
            if to == self.election.member_id:
                raise P.invalid(f"{to!r} leads already")
            if to not in standbys:
                raise P.not_found("standby member", str(to))
        elif not standbys:
            raise P.invalid("no standby member runs: nobody to hand over to")
        assert self.term is not None
        lease = (await self.etcd.lease_grant(2 * self.cfg.ttl)).id
        await self.election.guarded_put(
            self._handover, json.dumps({"from": self.election.member_id, "to": to}),
            self.term.term.token, lease=lease)
        log.warning("stepping down%s, as asked", f" for {to}" if to else "")
        self.stepping_down.set()
        return {"leader": self.election.member_id, "to": to, "standbys": standbys}

    async def took_over(self, gt: GroupTerm) -> None:
        """Just elected: a handover that named us (or anyone) is done; remove it."""
        self.stepping_down = trio.Event()
        try:
            await self.election.guarded_delete(self._handover, gt.term.token)
        except EtcdError as e:
            log.info("group handover key: %s (it expires by itself)", e)

    async def my_turn(self) -> tuple[bool, int]:
        """Whether we may lead now: no handover (group.step_down) is under way, or it is
        for us (it names us, or any member and we are not the one stepping down); and
        the etcd revision this was read at."""
        try:
            r = await self.etcd.get(self._handover)
        except EtcdError:
            return True, 0  # etcd's own fence still holds; campaign() waits for etcd
        if r.kv is None:
            return True, r.revision
        try:
            h = json.loads(r.kv.value)
            frm, to = h.get("from"), h.get("to")
        except (ValueError, AttributeError):
            return True, r.revision
        me = self.election.member_id
        return to == me or (to is None and frm != me), r.revision

    async def wait_turn(self) -> None:
        """Before a campaign: wait while a handover under way is not for us, until it
        changes (the new leader removes it, or its lease of two TTLs runs out)."""
        while True:
            mine, rev = await self.my_turn()
            if mine:
                return
            try:
                async with self.etcd.watch(self._handover, start_revision=rev + 1) as w:
                    await w.__anext__()  # any change: look again
            except EtcdError as e:
                log.info("waiting for a handover: %s", e)
                await trio.sleep(1)

    async def follow(self) -> None:
        """Keep self.leader current (an etcd watch on the leader key), for ever."""
        while True:
            try:
                async with self.election.observe() as leaders:
                    async for leader in leaders:
                        if leader != self.leader:
                            log.info("group leader: %s", leader or "none")
                        self.leader = leader
            except EtcdError as e:
                log.warning("watching the group's leader: %s; again in 1 s", e)
                await trio.sleep(1)


@asynccontextmanager
async def open_group(cfg: GroupConfig) -> AsyncIterator[tuple[Election, Member]]:
    """The etcd client, this member's Election and its Member (whose follow() and
    roster() run in the background) for the block's duration."""
    member_id = cfg.member_id or member_name(cfg.advertise)
    async with open_etcd(cfg.etcd, security=cfg.etcd_security) as etcd, \
            open_election(etcd, cfg.prefix, member_id=member_id, address=cfg.advertise,
                          ttl=cfg.ttl) as election:
        member = Member(election, cfg)
        async with trio.open_nursery() as n:
            n.start_soon(member.follow)
            n.start_soon(member.roster)
            yield election, member
            n.cancel_scope.cancel()


@dataclass(frozen=True)
class GroupTerm:
    """What a leader's service needs of the group: the election (for fenced writes,
    Election.guarded_put) and the term it serves in (Term: token, whether it ended)."""

    election: Election
    term: Term
    standby: Standby | None = None  # this member's hot state until now, if any

    async def recovered(self) -> GroupRecovery | None:
        """The hot standby's state brought to the head read now (after the win, so no
        earlier term can move it any more), or None without a standby."""
        if self.standby is None:
            return None
        head = await read_head(self.election.client, self.standby.prefix)
        if head is None:
            return GroupRecovery(State(), None)
        hot = self.standby
        was = hot.seq
        rec = await hot.take(head)
        log.info("hot standby: taking over at seq %d (it was at %d; %d records applied "
                 "while standing by, %d full recoveries)", rec.state.seq, was, hot.applied,
                 hot.full_recoveries)
        return rec

    def leads(self) -> bool:
        """The term has not ended, by what we know (Term.check: etcd's word, or our own
        count of the lease); False means: write nothing more. Call it from trio only
        (it ends the term when the lease has run out); worker threads use may_write."""
        try:
            self.term.check()
        except LeadershipLost:
            return False
        return True

    def may_write(self) -> bool:
        """The service's writegate.WriteGate (Context.may_write): whether the term still
        holds (Term.in_force). Read-only and safe from worker threads, which ask it
        right before each container write (docs/ha.md, "Split brain")."""
        return self.term.in_force()


LeaderBody = Callable[[GroupTerm], Awaitable[None]]


async def lead_for_ever(election: Election, member: Member, serve: LeaderBody,
                        on_lost: Callable[[], int]) -> None:
    """For ever: wait our turn (Member.wait_turn), campaign, and while we lead run
    serve(GroupTerm) (it calls member.serving once it serves). When the term ends, or
    we step down (group.step_down: serve is cancelled, then we resign), go back to
    standby, call on_lost() (it closes every connection) and start again. Cancelled
    (a clean stop), it resigns on the way out (Election.lead)."""
    while True:
        await member.wait_turn()
        why = "stepped down as asked"
        hot = Standby(member.state_dir, election.client, member.cfg.prefix)
        member.hot = hot
        try:
            async with trio.open_nursery() as tail:
                hot_scope = trio.CancelScope()

                tail.start_soon(_run_until, hot.run, hot_scope)  # hot until elected
                async with election.lead() as term:
                    hot_scope.cancel()
                    if not (await member.my_turn())[0]:
                        # a standby already waiting on the key won the race of a
                        # handover for another member: give it back (lead() resigns)
                        log.info("won term %d during a handover for another member; "
                                 "resigning", term.token)
                        continue
                    log.info("this member leads group %s (term %d)", election.key,
                             term.token)
                    member.elections_won += 1
                    gt = GroupTerm(election, term, hot)
                    await member.took_over(gt)
                    try:
                        async with trio.open_nursery() as n:
                            async def on_step_down() -> None:
                                await member.stepping_down.wait()
                                n.cancel_scope.cancel()
                            n.start_soon(on_step_down)
                            await serve(gt)
                            n.cancel_scope.cancel()
                    finally:
                        member.standby()
        except LeadershipLost as e:
            why = str(e)
        except BaseExceptionGroup as eg:  # from the service's tasks (a fenced commit)
            lost = eg.subgroup(LeadershipLost)
            if lost is None or eg.subgroup(lambda x: not isinstance(
                    x, LeadershipLost | trio.Cancelled | BaseExceptionGroup)) is not None:
                raise
            why = "; ".join(sorted({str(x) for x in _leaves(lost)}))
        member.standby()
        member.step_downs += 1
        n_closed = on_lost()
        log.warning("stepped down: %s; %d connection(s) closed; a standby now", why,
                    n_closed)


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for x in eg.exceptions:
        out.extend(_leaves(x) if isinstance(x, BaseExceptionGroup) else [x])
    return out


async def _run_until(fn: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    """fn() until scope is cancelled."""
    with scope:
        await fn()
