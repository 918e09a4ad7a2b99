"""Container labels at run time: who each container belongs to (docs/labels.md).

The controller writes a container's label when it joins (``container add``),
checks every label before it serves (``check_all``, from ``Service.start``),
labels the containers of a state from before labels, and beats each labelled
container's heartbeat while it runs. A container that another installation
labelled is refused at add (``--force`` takes it over once its heartbeat has
stood still long enough) and failed if it turns up later.
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
from .context import Context
from .movement import MoveGone, Movement

log = logging.getLogger(__name__)


class Labels:
    """The label job: check, write, relocate and beat container labels.

    Owns the heartbeat counter, the LUNs whose beat is in flight, the LUNs another
    installation claimed (LUN -> its label's owner line) and the notes on containers
    still unlabelled (LUN -> why).
    """

    def __init__(self, ctx: Context, movement: Movement):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.movement = movement
        # how long after our last beat our agents may still do I/O: their lease
        self.hold = ctx.agents.lease + LEASE_MARGIN
        self._counter = 0
        self._beating: dict[int, trio.Event] = {}  # LUN -> set when its beat is done
        self._beat_failed: set[int] = set()
        self.claimed: dict[int, str] = {}
        self.unlabelled: dict[int, str] = {}

    # ------------------------------------------------------------ pieces
    def label_for(self, c_name: str, lun: int, size: int, cid: str) -> L.Label:
        """The label this installation writes for a container."""
        assert self.state.installation is not None  # chosen by Coherence.start
        return L.Label(self.state.installation, cid, size, lun, c_name, time.time())

    def beat(self) -> L.Beat:
        """The next heartbeat of this controller."""
        assert self.state.installation is not None
        self._counter += 1
        return L.Beat(self.state.installation, self._counter, time.time(),
                      L.HEARTBEAT_INTERVAL, self.hold)

    def describe(self, c: Container) -> str:
        """The label's state for vdctl: ok, none (with why), or claimed (by whom)."""
        if c.lun in self.claimed:
            return f"claimed by {self.claimed[c.lun]}"
        if c.uuid is None:
            return f"none ({self.unlabelled.get(c.lun, 'not labelled yet')})"
        return "ok"

    def _is_ours(self, lab: L.Label | None, c: Container) -> bool:
        return (lab is not None and lab.installation == self.state.installation
                and lab.container == c.uuid)

    # ------------------------------------------------------------ container add
    async def probe_new(self, path: str, force: bool) -> None:
        """Refuse to add an existing path that belongs to someone else.

        - a label of another installation: E_BUSY, unless force and its heartbeat stands
          still for ``label.takeover_wait`` seconds (E_BUSY if it moves);
        - a label of this installation for a container it has now: E_EXISTS;
        - a damaged label: E_INVALID unless force;
        - another format's signature (blkid -p: a file system, a partition table, an
          LVM or ZFS label): E_INVALID unless force, which wipes it (wipefs -a).
        OSError reading the path becomes E_IO.
        """
        try:
            s0, s1 = await trio.to_thread.run_sync(L.read_sectors, path)
        except OSError as e:
            raise P.RemoteError(P.E_IO, f"cannot read {path!r}: {e.strerror}") from None
        try:
            lab = L.decode(s0)
        except L.LabelError as e:
            if not force:
                raise P.invalid(f"{path!r} carries a damaged virtfs label ({e}); add it "
                                "with --force to label it anew") from None
            lab = None
        if lab is not None:
            if lab.installation == self.state.installation:
                for c in self.state.containers.values():
                    if c.uuid == lab.container:
                        raise P.RemoteError(P.E_EXISTS, f"{path!r} is already container "
                                            f"{c.name!r} (its label says so)")
                return  # a label a removed container of ours left behind
            if not force:
                raise P.RemoteError(
                    P.E_BUSY, f"{path!r} belongs to another virtfs installation "
                    f"({lab.owner()}); add it with --force to take it over once that "
                    "installation no longer uses it")
            await self._wait_still(path, s1)
        else:
            sigs = await trio.to_thread.run_sync(L.signatures, path)
            if sigs and not force:
                raise P.invalid(f"{path!r} holds {' and '.join(sigs)} (blkid -p); refusing "
                                "to overwrite it (add it with --force to wipe it)")
            if sigs:
                try:
                    await trio.to_thread.run_sync(L.wipe_signatures, path)
                except OSError as e:
                    raise P.RemoteError(P.E_IO, str(e)) from None
                log.warning("container path %s: wiped %s (--force)", path, ", ".join(sigs))

    async def _wait_still(self, path: str, s1: bytes) -> None:
        """Watch path's heartbeat for label.takeover_wait seconds; E_BUSY if it moves."""
        try:
            before = L.decode_beat(s1)
        except L.LabelError:
            before = None
        wait = L.takeover_wait(before, self.hold)
        log.warning("container path %s: --force: watching its owner's heartbeat for %.1f s",
                    path, wait)
        await trio.sleep(wait)
        s1b = b""
        try:
            _s0, s1b = await trio.to_thread.run_sync(L.read_sectors, path)
            after = L.decode_beat(s1b)
        except (OSError, L.LabelError):
            after = None
        if s1b != s1:
            owner = after.installation[:12] if after else "another installation"
            raise P.RemoteError(P.E_BUSY, f"{path!r} is still in use: {owner}'s controller "
                                f"beat its heartbeat during the {wait:.1f} s check; remove it "
                                "there first")

    async def write_new(self, path: str, lab: L.Label) -> None:
        """Write a new container's label and first beat; E_IO on failure."""
        try:
            await trio.to_thread.run_sync(L.write_label, path, lab, self.beat())
        except OSError as e:
            raise P.RemoteError(P.E_IO, f"cannot write the label of {path!r}: "
                                f"{e.strerror}") from None

    async def wipe(self, c: Container) -> str | None:
        """Zero a removed container's label block; a warning line if that failed."""
        if c.uuid is None or c.lun in self.claimed:
            return None
        beating = self._beating.get(c.lun)
        if beating is not None:
            await beating.wait()  # a beat in flight would write after the wipe
        try:
            await trio.to_thread.run_sync(L.wipe, c.path)
        except OSError as e:
            return f"could not erase its label: {e.strerror}"
        return None

    async def restore(self, name: str) -> dict[str, object]:
        """container restore, after checking that the label is ours again: E_BUSY while
        another installation's label is on it."""
        c = self.ctx.container(name)
        if c.lun in self.claimed:
            try:
                s0, _s1 = await trio.to_thread.run_sync(L.read_sectors, c.path)
                lab = L.decode(s0)
            except (OSError, L.LabelError):
                lab = None
            if lab is not None and not self._is_ours(lab, c):
                raise P.RemoteError(P.E_BUSY, f"container {name!r} carries the label of "
                                    f"{lab.owner()}; its data is not this installation's "
                                    "any more")
            del self.claimed[c.lun]
            if lab is None:
                await self._write_or_warn(c)
        return await self.movement.container_restore(name)

    # ------------------------------------------------------------ at start
    async def check_all(self) -> None:
        """Before serving: every labelled container must carry its label (rewritten if
        it is missing or damaged, failed if another installation's is there), and every
        container from before labels is labelled now or, if its first block holds data,
        once that data has moved (``relocate_all``)."""
        for c in list(self.state.containers.values()):
            try:
                s0, _s1 = await trio.to_thread.run_sync(L.read_sectors, c.path)
            except OSError as e:
                log.warning("container %s (%s): cannot read its label: %s", c.name, c.path,
                            e.strerror)
                continue
            try:
                lab = L.decode(s0)
            except L.LabelError as e:
                log.warning("container %s (%s): damaged label (%s)", c.name, c.path, e)
                lab = None
            if lab is not None and not self._is_ours(lab, c):
                await self._claimed(c, lab)
            elif c.uuid is not None and lab is None:
                log.warning("container %s (%s): its label is missing; writing it again",
                            c.name, c.path)
                await self._write_or_warn(c)
            elif c.uuid is None:
                await self.label_old(c)

    async def _claimed(self, c: Container, lab: L.Label) -> None:
        owner = lab.owner()
        self.claimed[c.lun] = owner
        log.error("container %s (%s) carries the label of %s: another installation took "
                  "it over; failing it here", c.name, c.path, owner)
        if not c.failed:
            await self.movement.container_fail(c.name)

    async def _write_or_warn(self, c: Container) -> None:
        assert c.uuid is not None
        try:
            await self.write_new(c.path, self.label_for(c.name, c.lun, c.size, c.uuid))
        except P.RemoteError as e:
            log.warning("container %s: %s", c.name, e.message)

    async def label_old(self, c: Container) -> bool:
        """Label a container from before labels if its first block is free (True)."""
        if c.uuid is not None:
            return True
        if not c.space.is_free(0, P.LABEL_BYTES):
            self.unlabelled[c.lun] = "its first block holds data"
            return False
        await self.journal.commit(ContainerLabel(c.name, L.new_id()))
        await self._write_or_warn(c)
        self.unlabelled.pop(c.lun, None)
        log.info("container %s (%s): labelled", c.name, c.path)
        return True

    async def relocate_all(self) -> None:
        """(background) Move the data off the first block of every unlabelled container
        whose first block one disk alone uses, then label it. A block a snapshot uses
        stays: that container is labelled at a later start, once the block is free."""
        for c in list(self.state.containers.values()):
            if c.uuid is None and not await self.label_old(c):
                try:
                    await self._relocate(c)
                except (P.RemoteError, MoveGone, OSError) as e:
                    note = getattr(e, "message", None) or str(e)
                    self.unlabelled[c.lun] = f"its first block holds data; moving it: {note}"
                    log.warning("container %s: cannot move the data off its first block "
                                "for its label: %s", c.name, note)

    async def _relocate(self, c: Container) -> None:
        users = [(t, e) for t, e in self.state.lun_users(c.lun) if e.offset < P.LABEL_BYTES]
        if len(users) != 1 or self.state.disks.get(users[0][0].name) is not users[0][0]:
            names = ", ".join(sorted({t.name for t, _ in users}))
            self.unlabelled[c.lun] = (f"its first block holds data of {names}; labelled once "
                                      "that is gone")
            return
        d, e = users[0]
        if e.flags & MOVING or not self.movement.may_start(d):
            self.unlabelled[c.lun] = "its first block is moving; labelled at a later start"
            return
        unit = Extent(e.vstart, P.LABEL_BYTES, e.lun, e.offset, e.flags)
        async with self.ctx.dlock(d):
            started = await self.movement.start_move(d, unit, c.lun)
        log.info("container %s: moving disk %s's block at %d off the container's first "
                 "block, for its label", c.name, d.name, e.vstart)
        for vs in started:
            await self.movement.run_move(d, vs)
        if not await self.label_old(c):
            self.unlabelled[c.lun] = "its first block still holds data after a move"

    # ------------------------------------------------------------ heartbeat
    async def run(self) -> None:
        """(background) Relocate what the first labels need, then beat every labelled
        container's heartbeat every label.HEARTBEAT_INTERVAL seconds, for the service's
        life."""
        self.ctx.spawn(self.relocate_all)
        while True:
            for c in list(self.state.containers.values()):
                if c.uuid is not None and c.lun not in self.claimed and \
                        c.lun not in self._beating:
                    self._beating[c.lun] = trio.Event()
                    self.ctx.spawn(self._beat_one, c)
            await trio.sleep(L.HEARTBEAT_INTERVAL)

    async def _beat_one(self, c: Container) -> None:
        try:
            lab = await trio.to_thread.run_sync(self._check_and_beat, c, self.beat())
        except OSError as e:
            if c.lun not in self._beat_failed:
                log.warning("container %s (%s): heartbeat failed: %s", c.name, c.path,
                            e.strerror)
            self._beat_failed.add(c.lun)
            return
        finally:
            self._beating.pop(c.lun).set()
        self._beat_failed.discard(c.lun)
        if lab is not None and self.state.luns.get(c.lun) is c:
            await self._claimed(c, lab)

    def _check_and_beat(self, c: Container, beat: L.Beat) -> L.Label | None:
        """(worker thread) Beat c's heartbeat if its label is still ours; the label found
        instead if another installation's is there."""
        s0, _s1 = L.read_sectors(c.path)
        try:
            lab = L.decode(s0)
        except L.LabelError:
            lab = None  # torn or damaged: keep beating; the next start rewrites it
        if lab is not None and not self._is_ours(lab, c):
            return lab
        L.write_beat(c.path, beat)
        return None
