"""Reading a group's journal back: the head in etcd, the term files, the checkpoints.

A group of controllers (issue 14, docs/ha.md "The journal in a group") shares one
state dir. Its files:

- ``journal.TOKEN.K``: the K-th journal file of the leader term named TOKEN (the
  leader key's create_revision, controller/election.py). K is 0 when the term starts
  and grows by one at each of its checkpoints. File 0 begins with a *start frame*,
  ``{"op": "term.start", "term": TOKEN, "prev_term": P, "prev_head": S}``: the head
  in etcd when the term began (term P at seq S; 0, 0 in a new group), written and
  fdatasync'ed before the term's first head move. Every other frame is a record
  with its ``seq``, as in the local journal.
- ``checkpoint.TOKEN.SEQ``: a checkpoint written in term TOKEN of the state at SEQ.
- the head key ``PREFIX/journal/head`` in etcd: ``{"term": T, "seq": H}``, moved by
  the leader of term T only (a txn fenced by its token) once the records up to H are
  fdatasync'ed in its files. Only records up to the head count.

Recovery, from the head: term T counts up to H; T's start frame says the term
before counts up to S; and so on back, as far as start frames remain (a checkpoint
retires the older files). That gives each term of the chain its *cut*. The
checkpoint used is the newest ``checkpoint.T.SEQ`` with T in the chain and
SEQ <= cut(T) (a checkpoint past its term's cut holds records that never counted:
its term was deposed before they did). Then each term's files are replayed in
chain order, each only up to its cut; frames past a cut (a deposed leader's, or
a crash's between fdatasync and the head move) are ignored. Recovery writes
nothing: another controller may still be writing its own term's file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import trio

from . import frames
from .checkpoint import load_checkpoint
from .etcd import EtcdClient
from .frames import JournalCorrupt
from .state import State
from .tables import StateError

RETRIES = 3  # recoveries tried when files vanish meanwhile
START = "term.start"  # the op of a term file's first frame
TERM_FILE = re.compile(r"journal\.(\d+)\.(\d+)")
CHECKPOINT_FILE = re.compile(r"checkpoint\.(\d+)\.(\d+)")


def term_file(token: int, k: int) -> str:
    """The name of term token's k-th journal file."""
    return f"journal.{token}.{k}"


def checkpoint_file(token: int, seq: int) -> str:
    """The name of a checkpoint written in term token, of the state at seq."""
    return f"checkpoint.{token}.{seq}"


def head_key(prefix: str) -> str:
    """The journal head's key in etcd for the group on prefix (beside PREFIX/leader)."""
    return prefix.rstrip("/") + "/journal/head"


@dataclass(frozen=True)
class Head:
    """The journal's durable head: every record up to seq counts; term (a token) moved
    it last."""

    term: int
    seq: int

    def encode(self) -> bytes:
        """The head key's value: JSON ``{"term": T, "seq": H}``."""
        return json.dumps({"term": self.term, "seq": self.seq}).encode()

    @classmethod
    def decode(cls, value: bytes) -> Head:
        """The head a key's value names; JournalCorrupt if it is not one."""
        try:
            d = json.loads(value)
            term, seq = d["term"], d["seq"]
        except (ValueError, TypeError, KeyError):
            raise JournalCorrupt(f"journal head in etcd is not ours: {value[:80]!r}") from None
        if not (isinstance(term, int) and isinstance(seq, int) and term > 0 and seq >= 0):
            raise JournalCorrupt(f"journal head in etcd is not ours: {value[:80]!r}")
        return cls(term, seq)


async def read_head(client: EtcdClient, prefix: str) -> Head | None:
    """The head now (a linearizable read), or None if no commit ever counted. Raises
    EtcdError as the read does, JournalCorrupt for a value that is not a head."""
    kv = (await client.get(head_key(prefix))).kv
    return Head.decode(kv.value) if kv else None


@dataclass
class GroupRecovery:
    """What recover_files found: the state at the head, and how it got there."""

    state: State
    head: Head | None
    records: int = 0  # records replayed on top of the checkpoint
    checkpoint: str | None = None  # the checkpoint file used
    cuts: dict[int, int] = field(default_factory=dict)  # term token -> its last counted seq
    ignored: int = 0  # frames past their term's cut
    journal_bytes: int = 0  # size of the term files replayed (the checkpoint's trigger)


def listing(state_dir: str) -> tuple[dict[int, list[int]], list[tuple[int, int]]]:
    """({token: sorted file numbers}, [(token, seq) of checkpoints])."""
    terms: dict[int, list[int]] = {}
    ckpts: list[tuple[int, int]] = []
    for name in os.listdir(state_dir):
        if m := TERM_FILE.fullmatch(name):
            terms.setdefault(int(m[1]), []).append(int(m[2]))
        elif m := CHECKPOINT_FILE.fullmatch(name):
            ckpts.append((int(m[1]), int(m[2])))
    for ks in terms.values():
        ks.sort()
    return terms, ckpts


def read_start(path: str) -> dict[str, int]:
    """The start frame of a term's file 0: {"term", "prev_term", "prev_head"}.
    Raises JournalCorrupt if the file does not begin with one."""
    with open(path, "rb") as f:
        first = next(iter(frames.FrameReader(f)), None)
    if not (isinstance(first, dict) and first.get("op") == START
            and all(isinstance(first.get(k), int) for k in ("term", "prev_term", "prev_head"))):
        raise JournalCorrupt(f"{path}: does not begin with a term's start frame")
    return {k: first[k] for k in ("term", "prev_term", "prev_head")}


def chain_cuts(state_dir: str, head: Head, terms: dict[int, list[int]]) -> dict[int, int]:
    """Each term of the chain ending at head, with the last seq that counts in it."""
    cuts = {head.term: head.seq}
    t = head.term
    while 0 in terms.get(t, []):
        path = os.path.join(state_dir, term_file(t, 0))
        start = read_start(path)
        prev, at = start["prev_term"], start["prev_head"]
        if start["term"] != t or prev >= t or at > cuts[t]:
            raise JournalCorrupt(f"{path}: start frame {start} does not fit the chain")
        if prev == 0:
            break
        cuts[prev] = at
        t = prev
    return cuts


def recover_files(state_dir: str, head: Head | None) -> GroupRecovery:
    """The state a group's state dir holds up to head (read from etcd), and how.

    Blocks (file I/O); writes nothing. Raises JournalCorrupt when records that count
    are missing or damaged, or do not apply, or a start frame is bad; OSError as
    reads do.
    """
    if head is None:  # no commit ever counted: nothing in the files does
        return GroupRecovery(State(), None)
    terms, ckpts = listing(state_dir)
    cuts = chain_cuts(state_dir, head, terms)
    good = [(seq, t) for t, seq in ckpts if t in cuts and seq <= cuts[t]]
    name = None
    state = State()
    if good:
        seq, t = max(good)
        name = checkpoint_file(t, seq)
        state = load_checkpoint(state_dir, name)
        if state.seq != seq:
            raise JournalCorrupt(f"{name}: holds seq {state.seq}, its name says {seq}")
    rec = GroupRecovery(state, head, checkpoint=name, cuts=cuts)
    for t in sorted(cuts):
        cut = cuts[t]
        if cut <= state.seq:
            continue  # wholly in the checkpoint
        rec.ignored += _replay_term(state_dir, t, terms.get(t, []), cut, rec)
        if state.seq != cut:
            raise JournalCorrupt(f"term {t}: records up to seq {cut} count, but its files "
                                 f"({state_dir}/journal.{t}.*) end at seq {state.seq}")
    return rec


def _replay_term(state_dir: str, t: int, ks: list[int], cut: int, rec: GroupRecovery) -> int:
    """Apply term t's records after rec.state.seq up to cut, from its files ks; the
    number of frames found past cut (ignored)."""
    state = rec.state
    ignored = 0
    for k in ks:
        path = os.path.join(state_dir, term_file(t, k))
        with open(path, "rb") as f:
            rec.journal_bytes += os.fstat(f.fileno()).st_size
            n = 0
            for r in frames.FrameReader(f):
                n += 1
                if k == 0 and n == 1 and isinstance(r, dict) and r.get("op") == START:
                    continue
                if not isinstance(r, dict) or not isinstance(r.get("seq"), int):
                    raise JournalCorrupt(f"{path}: frame #{n} has no sequence number")
                seq: int = r["seq"]
                if seq <= state.seq:
                    continue  # in the checkpoint already
                if seq > cut:  # never counted: a deposed term's, or a crash's
                    ignored += 1
                    continue
                if seq != state.seq + 1:
                    raise JournalCorrupt(f"{path}: frame #{n}: expected seq {state.seq + 1}, "
                                         f"found {seq}: records are missing")
                try:
                    state.apply_wire(r)
                except StateError as e:
                    raise JournalCorrupt(f"{path}: frame #{n} (seq {seq}) does not apply: "
                                         f"{e}") from None
                rec.records += 1
    return ignored


async def recover_group(state_dir: str, client: EtcdClient, prefix: str) -> GroupRecovery:
    """Read the head from etcd, then recover_files in a worker thread. A leader calls it
    after its campaign won: no earlier term can move the head any more, so the head
    read is final for them. Raises as read_head and recover_files do.

    A file that vanishes while it is read (a deposed leader's checkpoint retiring the
    files below it: they are then covered by its checkpoint) makes recovery start
    again from the listing, up to RETRIES times."""
    head = await read_head(client, prefix)
    for attempt in range(RETRIES):
        try:
            return await trio.to_thread.run_sync(recover_files, state_dir, head)
        except FileNotFoundError:
            if attempt == RETRIES - 1:
                raise
    raise AssertionError("unreachable")
