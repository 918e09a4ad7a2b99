"""Container labels at run time: who each container belongs to (docs/labels.md).

The controller writes a container's label when it joins (``container add``),
checks every label before it serves (``check_all``, from ``Service.start``),
labels the containers of a state from before labels, and beats each labelled
container's heartbeat while it runs. It never writes a label block that does
not already carry its own label, except at ``container add``, at the first
labelling of a container from before labels (whose label block it holds in
its tables), and at ``container restore --relabel``. A container whose label
is not its own (another installation's, another container's, missing,
damaged), or whose heartbeat stops landing, or where another controller
beats, is failed: no agent I/O reaches it until an admin restores it.
"""

from __future__ import annotations

import logging
import time

import trio

from .. import label as L
from .. import protocol as P
from ..agents import LEASE_MARGIN
from ..extents import MOVING, Extent
from ..records import ContainerLabel
from ..state import Container
from ..writegate import Fenced
from .context import Context
from .movement import MoveGone, Movement
from .placement import Placement

log = logging.getLogger(__name__)

READ_TIMEOUT = 10.0  # seconds a label read at start may take before the container is failed


async def _sectors(path: str, timeout: float = READ_TIMEOUT) -> tuple[bytes, bytes]:
    """label.read_sectors in a worker thread; OSError(ETIMEDOUT) if it hangs (the
    thread is abandoned: a hung path must not hold the controller)."""
    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(L.read_sectors, path, abandon_on_cancel=True)
    raise TimeoutError(f"reading {path} took more than {timeout:.0f} s")


class Labels:
    """The label job: check, write, relocate and beat container labels.

    Owns this controller run's id and beat counter, the beats in flight (LUN ->
    done), the time each container's last beat landed, the containers failed for
    their label (LUN -> why) and the notes on containers still unlabelled.
    """

    def __init__(self, ctx: Context, movement: Movement, placement: Placement):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.movement = movement
        self.placement = placement
        # how long after our last beat our agents may still do I/O: their lease
        self.hold = ctx.agents.lease + LEASE_MARGIN
        self.run_id = L.new_id()
        self._counter = 0
        self._beating: dict[int, trio.Event] = {}
        self._landed: dict[int, float] = {}  # LUN -> trio time its last beat landed
        self._wrote: dict[int, int] = {}  # LUN -> the counter of our last beat there
        self.problems: dict[int, str] = {}  # LUN -> why its label failed it
        self.unlabelled: dict[int, str] = {}
        self._checked: set[int] = set()  # LUNs whose sector 0 check_all could read

    # ------------------------------------------------------------ pieces
    def label_for(self, c_name: str, lun: int, size: int, cid: str) -> L.Label:
        """The label this installation writes for a container."""
        assert self.state.installation is not None  # chosen by Coherence.start
        return L.Label(self.state.installation, cid, size, lun, c_name, time.time())

    def beat(self) -> L.Beat:
        """The next heartbeat of this controller run."""
        assert self.state.installation is not None
        self._counter += 1
        return L.Beat(self.state.installation, self.run_id, self._counter, time.time(),
                      L.HEARTBEAT_INTERVAL, self.hold)

    def describe(self, c: Container) -> str:
        """The label's state for vdctl: ok, none (with why), or failed (why)."""
        if c.lun in self.problems:
            return self.problems[c.lun]
        if c.uuid is None:
            return f"none ({self.unlabelled.get(c.lun, 'not labelled yet')})"
        return "ok"

    def _judge(self, s0: bytes, c: Container) -> str | None:
        """None if sector 0 holds c's label, else why not (label.judge)."""
        return L.judge(s0, self.state.installation, c.uuid)

    async def _fail(self, c: Container, why: str) -> None:
        """Fail c (every entry on it turns `error` at the agents) for its label."""
        if self.problems.get(c.lun) != why:
            log.error("container %s (%s): label %s; failing it (container restore once "
                      "it is right; docs/labels.md)", c.name, c.path, why)
        self.problems[c.lun] = why
        if self.state.luns.get(c.lun) is c and not c.failed:
            await self.movement.container_fail(c.name)

    # ------------------------------------------------------------ container add
    async def probe_new(self, path: str, force: bool) -> None:
        """Refuse to add an existing path that belongs to someone else.

        - a label (or heartbeat) of another installation, or a damaged one: E_BUSY or
          E_INVALID, unless force and the heartbeat stands still for
          ``label.takeover_wait`` seconds (E_BUSY if it moves);
        - a label of this installation for a container it has now: E_EXISTS;
        - another format's signature (blkid -p: a file system, a partition table, an
          LVM or ZFS member; or something blkid cannot tell): E_INVALID unless force,
          which wipes it (wipefs -a).
        OSError reading the path becomes E_IO.
        """
        try:
            s0, s1 = await _sectors(path)
        except OSError as e:
            raise P.RemoteError(P.E_IO, f"cannot read {path!r}: {e}") from None
        try:
            lab = L.decode(s0)
        except L.LabelError as e:
            if not force:
                raise P.invalid(f"{path!r} carries a damaged virtfs label ({e}); add it "
                                "with --force to take it over once nothing uses it") from None
            await self._wait_still(path, s1)
            return
        if lab is not None and lab.installation == self.state.installation:
            for c in self.state.containers.values():
                if c.uuid == lab.container:
                    raise P.RemoteError(P.E_EXISTS, f"{path!r} is already container "
                                        f"{c.name!r} (its label says so)")
            return  # a label a removed container of ours left behind
        if lab is not None or s1[:8] == L.HB_MAGIC:
            if not force:
                owner = lab.owner() if lab is not None else "a heartbeat without a label"
                raise P.RemoteError(
                    P.E_BUSY, f"{path!r} belongs to another virtfs installation "
                    f"({owner}); add it with --force to take it over once that "
                    "installation no longer uses it")
            await self._wait_still(path, s1)
            return
        sigs = await trio.to_thread.run_sync(L.signatures, path)
        if sigs and not force:
            raise P.invalid(f"{path!r} holds {' and '.join(sigs)} (blkid -p); refusing to "
                            "overwrite it (add it with --force to wipe it)")
        if sigs:
            try:
                await trio.to_thread.run_sync(L.wipe_signatures, path, self.ctx.may_write)
            except OSError as e:
                raise P.RemoteError(P.E_IO, str(e)) from None
            log.warning("container path %s: wiped %s (--force)", path, ", ".join(sigs))

    async def _wait_still(self, path: str, s1: bytes) -> None:
        """Watch path's heartbeat sector for label.takeover_wait seconds; E_BUSY if it
        changes (or cannot be read again)."""
        try:
            before = L.decode_beat(s1)
        except L.LabelError:
            before = None
        wait = L.takeover_wait(before, self.hold)
        log.warning("container path %s: --force: watching its owner's heartbeat for %.1f s",
                    path, wait)
        await trio.sleep(wait)
        try:
            _s0, s1b = await _sectors(path)
        except OSError as e:
            raise P.RemoteError(P.E_IO, f"cannot read {path!r} again: {e}") from None
        if s1b != s1:
            try:
                after = L.decode_beat(s1b)
            except L.LabelError:
                after = None
            owner = f"installation {after.installation[:12]}" if after else "its owner"
            raise P.RemoteError(P.E_BUSY, f"{path!r} is still in use: {owner}'s controller "
                                f"beat its heartbeat during the {wait:.1f} s check; remove it "
                                "there first")

    async def write_new(self, path: str, lab: L.Label) -> None:
        """Write a new container's label and first beat; E_IO on failure."""
        try:
            await trio.to_thread.run_sync(L.write_label, path, lab, self.beat(),
                                          self.ctx.may_write)
        except OSError as e:
            raise P.RemoteError(P.E_IO, f"cannot write the label of {path!r}: "
                                f"{e.strerror}") from None

    async def wipe(self, c: Container) -> str | None:
        """Zero a removed container's label block, if it still carries c's label; a
        warning line if it does not or cannot be written."""
        if c.uuid is None:
            return None
        beating = self._beating.get(c.lun)
        if beating is not None:
            await beating.wait()  # a beat in flight would write after the wipe
        try:
            s0, _s1 = await _sectors(c.path)
            why = self._judge(s0, c)
            if why is not None:
                return f"its label was left alone: {why}"
            await trio.to_thread.run_sync(L.wipe, c.path, self.ctx.may_write)
        except OSError as e:
            return f"could not erase its label: {e}"
        finally:
            self._forget(c.lun)
        return None

    def _forget(self, lun: int) -> None:
        self._landed.pop(lun, None)
        self._wrote.pop(lun, None)
        self.problems.pop(lun, None)
        self.unlabelled.pop(lun, None)
        self._checked.discard(lun)

    async def restore(self, name: str, relabel: bool = False) -> dict[str, object]:
        """container restore, once the label is ours again (Movement.container_restore).

        A container failed for its label is checked first: E_BUSY while another
        installation's or another container's label is on it; a missing or damaged
        label is written again only with relabel, and only where blkid finds no other
        format (E_INVALID otherwise)."""
        c = self.ctx.container(name)
        if c.lun in self.problems:
            try:
                s0, _s1 = await _sectors(c.path)
            except OSError as e:
                raise P.RemoteError(P.E_IO, f"cannot read the label of {name!r}: {e}") from None
            why = self._judge(s0, c)
            if why is not None and not why.startswith(("missing", "damaged")):
                raise P.RemoteError(P.E_BUSY, f"container {name!r}: label {why}; its data "
                                    "is not this installation's any more")
            if why is not None:
                if not relabel:
                    raise P.invalid(f"container {name!r}: label {why}; if {c.path!r} is "
                                    "the right file or device, restore it with --relabel")
                sigs = await trio.to_thread.run_sync(L.signatures, c.path)
                if sigs:
                    raise P.invalid(f"{c.path!r} holds {' and '.join(sigs)} (blkid -p): not "
                                    f"container {name!r}; not relabelled")
                assert c.uuid is not None
                await self.write_new(c.path, self.label_for(c.name, c.lun, c.size, c.uuid))
                log.warning("container %s (%s): label written again (--relabel)", c.name,
                            c.path)
            del self.problems[c.lun]
            self._wrote.pop(c.lun, None)
            self._landed[c.lun] = trio.current_time()
        return await self.movement.container_restore(name)

    # ------------------------------------------------------------ at start
    async def check_all(self) -> None:
        """Before serving: every labelled container must carry its label (else it is
        failed); a container from before labels is labelled now if its label block is
        free (or adopts a label of ours that a crash left unrecorded), else once its
        data has moved (``relocate_all``)."""
        for c in list(self.state.containers.values()):
            try:
                s0, _s1 = await _sectors(c.path)
            except OSError as e:
                log.warning("container %s (%s): cannot read its label: %s", c.name, c.path, e)
                if c.uuid is not None:
                    await self._fail(c, f"unreadable: {e}")
                continue
            self._checked.add(c.lun)
            if c.uuid is not None:
                why = self._judge(s0, c)
                if why is not None:
                    await self._fail(c, why)
                continue
            try:
                lab = L.decode(s0)
            except L.LabelError as e:
                self.unlabelled[c.lun] = f"its first sector holds a damaged label ({e})"
                continue
            if lab is None:
                await self.label_old(c)
            elif lab.installation == self.state.installation and not any(
                    x.uuid == lab.container for x in self.state.containers.values()):
                await self._adopt(c, lab)
            else:
                await self._fail(c, f"claimed by {lab.owner()}")

    async def _adopt(self, c: Container, lab: L.Label) -> None:
        """Record a label of ours that a crash left written but not journaled."""
        if not self.placement.plannable(c).is_free(0, P.LABEL_BYTES):
            await self._fail(c, "foreign: a label of ours over data")
            return
        await self.journal.commit(ContainerLabel(c.name, lab.container))
        log.info("container %s (%s): labelled (a label written before a crash)", c.name,
                 c.path)

    async def label_old(self, c: Container) -> bool:
        """Label a container from before labels if its label block is free, and check
        showed no label there (True if it is labelled now). The label is written first,
        with the block held out of every plan, then recorded."""
        if c.uuid is not None:
            return True
        if c.lun not in self._checked:
            return False
        if not self.placement.plannable(c).is_free(0, P.LABEL_BYTES):
            self.unlabelled[c.lun] = "its first MiB holds data"
            return False
        cid = L.new_id()
        with self.placement.reserved([(c.lun, 0, P.LABEL_BYTES)]):
            try:
                await self.write_new(c.path, self.label_for(c.name, c.lun, c.size, cid))
            except P.RemoteError as e:
                self.unlabelled[c.lun] = e.message
                return False
            await self.journal.commit(ContainerLabel(c.name, cid))
        self.unlabelled.pop(c.lun, None)
        log.info("container %s (%s): labelled", c.name, c.path)
        return True

    async def relocate_all(self) -> None:
        """(background) Move the data off the first MiB of every unlabelled container
        where only disks (no snapshot, no shared storage) use it, then label it. A MiB
        a snapshot uses stays: that container is labelled at a later start."""
        for c in list(self.state.containers.values()):
            if c.uuid is None and c.lun in self._checked and not await self.label_old(c):
                try:
                    await self._relocate(c)
                except (P.RemoteError, MoveGone, OSError) as e:
                    note = getattr(e, "message", None) or str(e)
                    self.unlabelled[c.lun] = f"its first MiB holds data; moving it: {note}"
                    log.warning("container %s: cannot move the data off its first MiB "
                                "for its label: %s", c.name, note)

    async def _relocate(self, c: Container) -> None:
        users = [(t, e) for t, e in self.state.lun_users(c.lun) if e.offset < P.LABEL_BYTES]
        tables = sorted({t.name for t, _ in users})
        spans = sorted((e.offset, e.offset + e.length) for _, e in users)
        shared = any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False))
        if shared or any(self.state.disks.get(t.name) is not t for t, _ in users):
            self.unlabelled[c.lun] = (f"its first MiB holds data of {', '.join(tables)}; "
                                      "labelled once that is gone")
            return
        for d, e in users:
            if e.flags & MOVING or not self.movement.may_start(d):
                self.unlabelled[c.lun] = "its first MiB is moving; labelled at a later start"
                return
        for d, e in users:
            length = min(e.length, P.LABEL_BYTES - e.offset)
            unit = Extent(e.vstart, length, e.lun, e.offset, e.flags)
            async with self.ctx.dlock(d):
                started = await self.movement.start_move(d, unit, c.lun)
            log.info("container %s: moving disk %s's %d bytes at %d off the container's "
                     "first MiB, for its label", c.name, d.name, length, e.vstart)
            for vs in started:
                await self.movement.run_move(d, vs)
        if not await self.label_old(c):
            self.unlabelled[c.lun] = "its first MiB still holds data after the moves"

    # ------------------------------------------------------------ heartbeat
    async def run(self) -> None:
        """(background) Relocate what the first labels need, then beat every labelled
        container's heartbeat every label.HEARTBEAT_INTERVAL seconds, for the service's
        life, and fail a container whose beats stop landing (docs/labels.md)."""
        self.ctx.spawn(self.relocate_all)
        stale = L.STALE_BEATS * L.HEARTBEAT_INTERVAL
        while True:
            now = trio.current_time()
            if not self.ctx.may_write():
                # a group's deposed leader (its term ended while it was paused: its own
                # beats stopped with it) neither beats nor fails containers for it
                await trio.sleep(L.HEARTBEAT_INTERVAL)
                continue
            for c in list(self.state.containers.values()):
                if c.uuid is None or c.lun in self.problems:
                    continue
                landed = self._landed.setdefault(c.lun, now)
                if now - landed > stale:
                    self.ctx.spawn(self._fail, c, f"unverified: no heartbeat landed for "
                                   f"{now - landed:.0f} s (another installation could take "
                                   "it over)")
                    continue
                if c.lun not in self._beating:
                    self._beating[c.lun] = trio.Event()
                    self.ctx.spawn(self._beat_one, c)
            await trio.sleep(L.HEARTBEAT_INTERVAL)

    async def _beat_one(self, c: Container) -> None:
        if not self.ctx.may_write():  # a group's deposed leader beats no more
            self._beating.pop(c.lun).set()
            return
        try:
            why = await trio.to_thread.run_sync(self._check_and_beat, c, self.beat(),
                                                self._wrote.get(c.lun))
        except OSError as e:
            if c.lun not in self.problems and not isinstance(e, Fenced):
                log.warning("container %s (%s): heartbeat failed: %s", c.name, c.path,
                            e.strerror)
            return
        finally:
            self._beating.pop(c.lun).set()
        if self.state.luns.get(c.lun) is not c or c.lun in self.problems:
            return
        if why is not None:
            await self._fail(c, why)
        else:
            self._landed[c.lun] = trio.current_time()

    def _check_and_beat(self, c: Container, beat: L.Beat, last: int | None) -> str | None:
        """(worker thread) Beat c's heartbeat if its label is still c's and the heartbeat
        sector still holds our last beat; else why not."""
        s0, s1 = L.read_sectors(c.path)
        why = self._judge(s0, c)
        if why is not None:
            return why
        if last is not None:
            try:
                seen = L.decode_beat(s1)
            except L.LabelError:
                seen = None
            if seen is None or (seen.run, seen.counter) != (self.run_id, last):
                who = (f"controller run {seen.run[:12]}" if seen is not None
                       and seen.installation == self.state.installation else "someone")
                return (f"contended: {who} wrote its heartbeat sector (a second controller "
                        "with this state dir's identity: a copied state dir?)")
        L.write_beat(c.path, beat, self.ctx.may_write)  # asked again right before it
        self._wrote[c.lun] = beat.counter
        return None
