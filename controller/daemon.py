"""virtfs-controller: lock the state dir, replay, serve, checkpoint on the way out."""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import __version__
from .agents import DEFAULT_LEASE
from .client import single_leaf
from .journal import Journal, JournalCorrupt, recover
from .server import Server, parse_addr, serve_listeners
from .service import Service

log = logging.getLogger("virtfs.controller")


def default_state_dir() -> str:
    env = os.environ.get("VIRTFS_STATE_DIR")
    if env:
        return os.path.abspath(env)
    return os.path.join(os.path.expanduser("~"), ".local", "state", "virtfs")


def default_socket(state_dir: str) -> str:
    return "unix:" + os.path.join(state_dir, "controller.sock")


class StateDirBusy(Exception):
    pass


def lock_state_dir(state_dir: str) -> int:
    """An exclusive flock on STATE_DIR/lock, held for the process's life. Absolute path."""
    if os.path.exists(state_dir) and not os.path.isdir(state_dir):
        raise StateDirBusy(f"state dir {state_dir} exists and is not a directory")
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateDirBusy(f"state dir {state_dir} is in use by another controller "
                               f"(pid {holder})") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@asynccontextmanager
async def open_controller_service(state_dir: str, listen: list[str] | None = None, *,
                                  checkpoint_bytes: int | None = None,
                                  lease: float = DEFAULT_LEASE) -> AsyncIterator[Service]:
    """Run a controller (journal committer + listeners) for the block's duration.

    Used by the daemon and by the agent's embedded mode.
    """
    lock_fd = lock_state_dir(state_dir)
    try:
        rec = recover(state_dir)
        if rec.truncated_at is not None:
            log.warning("journal: torn tail at offset %d dropped (%d bytes)",
                        rec.truncated_at, rec.dropped_bytes)
        log.info("state dir %s: seq %d, %d records replayed, %d disks, %d containers",
                 state_dir, rec.state.seq, rec.records, len(rec.state.disks),
                 len(rec.state.containers))
        kw: dict[str, Any] = {"journal_bytes": rec.journal_bytes}
        if checkpoint_bytes is not None:
            kw["checkpoint_bytes"] = checkpoint_bytes
        journal = Journal(state_dir, rec.state, **kw)
        service = Service(rec.state, journal, state_dir, lease=lease)
        server = Server(service.dispatch)
        addrs = listen or [default_socket(state_dir)]
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run)
                await service.start()
                await nursery.start(service.run_jobs)
                await nursery.start(serve_listeners, server, addrs)
                yield service
                nursery.cancel_scope.cancel()
            service.agents.shutdown()
            # a clean stop: everything queued was committed; checkpoint for a fast start
            if journal.durable_seq == rec.state.seq:
                journal.checkpoint_now_sync()
        finally:
            journal.close()
            for addr in addrs:
                if addr.startswith("unix:"):
                    try:
                        os.unlink(addr[5:])
                    except FileNotFoundError:
                        pass
    finally:
        os.close(lock_fd)


async def _run(state_dir: str, listen: list[str], lease: float) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with open_controller_service(state_dir, listen, lease=lease):
            print(f"virtfs-controller: serving {', '.join(listen)} (state dir {state_dir})",
                  file=sys.stderr, flush=True)
            async for sig in signals:
                log.info("signal %d: shutting down", sig)
                break


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="virtfs-controller",
        description="The virtfs controller: owns the authoritative segment tables, persists "
        "them in a journal in the state dir and serves agents and vdctl.",
    )
    p.add_argument("--state-dir", default=None,
                   help="where the journal, checkpoint, lock and socket live "
                   "(default: $VIRTFS_STATE_DIR or ~/.local/state/virtfs)")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help="unix:PATH (default unix:STATE_DIR/controller.sock); may repeat")
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE, metavar="SECONDS",
                   help=f"agent lease (default {DEFAULT_LEASE:.0f} s): how long an agent that "
                   "lost the controller keeps using its cached entries")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    state_dir = os.path.abspath(args.state_dir or default_state_dir())
    listen = args.listen or [default_socket(state_dir)]
    for addr in listen:  # before the state dir is touched
        try:
            kind, _ = parse_addr(addr)
        except ValueError as e:
            p.error(str(e))
        if kind != "unix":
            p.error("tcp:// listeners need TLS and tokens, which this release does not have "
                    "yet; use unix:PATH")
    try:
        if not 0.5 <= args.lease <= 3600:
            p.error("--lease must be between 0.5 and 3600 seconds")
        trio.run(_run, state_dir, listen, args.lease)
    except (StateDirBusy, JournalCorrupt, OSError, ValueError) as e:
        print(f"virtfs-controller: {e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as eg:
        leaf = single_leaf(eg)
        if isinstance(leaf, StateDirBusy | JournalCorrupt | OSError | ValueError):
            print(f"virtfs-controller: {leaf}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
