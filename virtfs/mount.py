"""virtfs-mount: the agent. init -> nursery (session, FUSE loop) -> clean close.

Without --controller, and with no controller answering on the state dir's
socket, it runs an embedded controller in-process (still listening on that
socket, so vdctl works) and creates a default sparse container on first use.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from controller import __version__, fsutil, metrics_http, sdnotify
from controller.client import (
    ConnectionLost,
    Refused,
    add_security_options,
    open_controller,
    security_from_args,
    single_leaf,
)
from controller.daemon import (
    JournalCorrupt,
    StateDirBusy,
    open_controller_service,
    setup_logging,
)
from controller.protocol import RemoteError
from controller.statedir import default_socket, default_state_dir
from controller.transport import ClientSecurity, SecurityConfigError, split_addrs
from controller.units import SizeError, format_size, parse_size, seconds_arg

from . import cfast
from .agent import Session
from .blockio import ContainerIO
from .cfast import CFast
from .datapath import fast_path_wanted
from .disks import Volumes
from .fuse_ops import Operations
from .metrics import AgentMetrics

log = logging.getLogger("virtfs.mount")

DEFAULT_CONTAINER = "default"
DEFAULT_CONTAINER_SIZE = "64G"
DEMO_DISK = "demo"
DEMO_SIZE = 1 << 30
CONNECT_TIMEOUT = 30.0
MAX_BACKGROUND = 64  # FUSE background requests in flight (--max-background)
# C readers of the FUSE fd (--fast-threads; cfast.py); 0: off. Two: on 2 cores a third
# reader did no better, and one leaves a request waiting while it copies 1 MiB
FAST_THREADS = 2


class MountError(Exception):
    pass


async def controller_answers(addr: str, security: ClientSecurity | None = None) -> bool:
    try:
        async with open_controller(addr, role="admin", name="virtfs-mount-probe", timeout=3.0,
                                   security=security):
            return True
    except (ConnectionLost, RemoteError, OSError, trio.TooSlowError):
        return False


def _default_container_path(state_dir: str) -> tuple[str, bool]:
    path = os.path.join(state_dir, "containers", "default.img")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return path, os.path.exists(path)


async def _prepare_embedded(service: Any, state_dir: str, size: int, demo: bool) -> None:
    if not service.state.containers:
        path, exists = _default_container_path(state_dir)
        info = await service.container_add(DEFAULT_CONTAINER, path, None if exists else size)
        print(f"virtfs-mount: created container {DEFAULT_CONTAINER!r} at {path} "
              f"({format_size(info['size'])}, sparse)", file=sys.stderr)
    if demo and DEMO_DISK not in service.state.disks:
        await service.disk_create(DEMO_DISK, DEMO_SIZE, False, None, None)
        print(f"virtfs-mount: created thin disk {DEMO_DISK!r} ({format_size(DEMO_SIZE)})",
              file=sys.stderr)


class Stopper:
    """What SIGINT and SIGTERM do, by phase: while starting, cancel the start (scope);
    while the FUSE loop runs, end it (pyfuse3.terminate: main() returns and the clean
    close follows); once the loop has ended (a first signal, or the kernel ended it:
    fusermount3 -u [-z]), nothing, the clean close is under way. (pyfuse3.terminate
    after pyfuse3.close uses the freed session: the process died of SIGSEGV.)"""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()  # around the whole start and serve
        self.phase = "starting"  # -> "running" -> "closing"
        self.stopped_early = False  # a signal cancelled the start

    def serving(self) -> None:
        """pyfuse3.init succeeded; main() runs next, in the same loop step."""
        self.phase = "running"

    def closing(self) -> None:
        """pyfuse3.main() returned; pyfuse3.close() follows: never terminate again."""
        self.phase = "closing"

    def signal(self, sig: int) -> None:
        """Apply signal sig (see the class docstring)."""
        if self.phase == "running":
            log.info("signal %d: unmounting", sig)
            self.phase = "closing"
            pyfuse3.terminate()
        elif self.phase == "starting":
            log.info("signal %d: stopping before the mount is up", sig)
            self.stopped_early = True
            self.scope.cancel()
        else:
            log.info("signal %d: already unmounting", sig)

    async def watch(self, rx: Any) -> None:
        """Apply every signal rx receives (trio.open_signal_receiver) until cancelled."""
        async for sig in rx:
            self.signal(sig)


# Signals that came before trio's receiver was installed or after it was closed (the
# default action would kill the process, exit 143, in the middle of a clean stop).
_LATE_SIGNALS: list[int] = []


def _note_signal(sig: int, _frame: object) -> None:
    _LATE_SIGNALS.append(sig)


async def _run(args: argparse.Namespace) -> None:
    """Serve the mount until unmounted or signalled; SIGINT and SIGTERM are handled
    from start to end (Stopper)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as rx:
        stopper = Stopper()
        if _LATE_SIGNALS:  # one came before trio took them over
            stopper.signal(_LATE_SIGNALS[-1])
        async with trio.open_nursery() as outer:
            outer.start_soon(stopper.watch, rx)
            with stopper.scope:
                await _serve(args, stopper)
            outer.cancel_scope.cancel()
        if stopper.stopped_early:
            print("virtfs-mount: stopped by a signal before the mount was up",
                  file=sys.stderr)


async def _serve(args: argparse.Namespace, stopper: Stopper) -> None:
    mountpoint, state_dir = args.mountpoint, args.state_dir
    addr = args.controller or default_socket(state_dir)
    # one endpoint for the agent's metrics and an embedded controller's
    registry = metrics_http.new_registry() if args.metrics is not None else None
    async with AsyncExitStack() as stack:
        service = None
        if args.controller is None and not await controller_answers(addr):
            service = await stack.enter_async_context(
                open_controller_service(state_dir, lease=args.lease, metrics=registry))
            await _prepare_embedded(service, state_dir, args.default_container_size, args.demo)
            log.info("embedded controller serving %s", addr)
        else:
            if args.demo:
                log.warning("--demo only applies to an embedded controller; ignored")
            print(f"virtfs-mount: connecting to the controller at {addr} (up to "
                  f"{args.connect_timeout:g} s)", file=sys.stderr, flush=True)
        session = Session(addr, mountpoint, call_timeout=args.fault_timeout,
                          security=args.security)
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(args.connect_timeout):
                    await nursery.start(session.run)
            except trio.TooSlowError:
                last = f" (last: {session.last_error})" if session.last_error else ""
                raise MountError(f"no controller answered at {addr} within "
                                 f"{args.connect_timeout:g} s{last}") from None
            except Refused as e:  # a wrong token, a certificate refused: at once
                raise MountError(e.message if addr in e.message
                                 else f"the controller at {addr}: {e.message}") from None
            io = ContainerIO(mountpoint)
            volumes = Volumes(session, io, fault_timeout=args.fault_timeout)
            volumes.data.fast = fast_path_wanted(not args.no_fast_path)
            if registry is not None:
                am = AgentMetrics(registry, session, io)
                volumes.data.set_metrics(am)
                nursery.start_soon(am.run)
                try:
                    host, port = metrics_http.serve(args.metrics, registry)
                except OSError as e:
                    raise MountError(f"--metrics {args.metrics}: {e.strerror}") from None
                print(f"virtfs-mount: metrics at http://{host}:{port}/metrics",
                      file=sys.stderr, flush=True)
            ops = Operations(volumes, nursery)
            cf = None
            if args.fast_threads and volumes.data.fast:
                why = cfast.unavailable()
                if why is not None:
                    log.warning("--fast-threads %d: %s; Python serves every request",
                                args.fast_threads, why)
                else:
                    cf = ops.cfast = CFast(volumes.data, args.fast_threads,
                                           writes=os.environ.get(cfast.WRITES_ENV) != "0")
                    cf.metrics = volumes.data.metrics
            options = set(pyfuse3.default_options)
            # the kernel checks each disk's mode, owner and group (docs/permissions.md):
            # pyfuse3's default, said here so that no change of it can drop it
            options |= {"fsname=virtfs", "subtype=virtfs", "default_permissions"}
            if args.allow_other:
                options.add("allow_other")
            if args.debug_fuse:
                options.add("debug")
            _warn_if_not_empty(mountpoint)
            try:
                pyfuse3.init(ops, mountpoint, options)
            except RuntimeError as e:
                raise MountError(f"cannot mount {mountpoint}: {e}") from None
            stopper.serving()
            if cf is not None:
                try:
                    cf.start()  # its threads read the FUSE fd; pyfuse3's loop does not
                except (OSError, ValueError, RuntimeError) as e:
                    log.warning("--fast-threads: cannot start the C readers (%s); Python "
                                "serves every request", e)
                    cf.stop()
                    cf = ops.cfast = None
            if cf is not None:
                nursery.start_soon(cf.fold_timer)

            async def read_ahead() -> None:
                await ops.initialized.wait()  # INIT caps read-ahead; raise it after
                await trio.to_thread.run_sync(set_read_ahead, mountpoint, args.read_ahead_kb)
                await trio.to_thread.run_sync(set_max_background, mountpoint,
                                              args.max_background)

            nursery.start_soon(read_ahead)
            print(f"virtfs-mount: {mountpoint} mounted (controller {addr})", file=sys.stderr,
                  flush=True)

            async def ready() -> None:
                await ops.initialized.wait()  # the kernel's INIT answered: the mount serves
                sdnotify.notify("READY=1", f"STATUS={mountpoint} mounted (controller {addr})")

            nursery.start_soon(ready)
            try:
                if cf is None:
                    await pyfuse3.main()
                else:
                    # the handlers of the requests handed over run in this nursery, so
                    # that, as in pyfuse3's loop, all have answered before close()
                    async with trio.open_nursery() as requests:
                        requests.start_soon(cf.run, requests)
                        try:
                            await pyfuse3.main(reader=False)
                        finally:
                            cf.stop()
            finally:
                if cf is not None:
                    cf.stop()  # joins its threads: before the fd closes
                    reads, writes, handed = cfast.stats()
                    print(f"virtfs-mount: the C fast path served {reads} reads and {writes} "
                          f"writes; {handed} requests went to Python", file=sys.stderr,
                          flush=True)
                stopper.closing()
                sdnotify.notify("STOPPING=1", f"STATUS=unmounting {mountpoint}")
                pyfuse3.close(unmount=True)
                with trio.move_on_after(10) as scope:
                    scope.shield = True
                    await _goodbye(volumes, io)
                    if service is not None:
                        _warn_of_orphans(service)
                io.close()
                nursery.cancel_scope.cancel()


def _warn_of_orphans(service: Any) -> None:
    """An embedded controller stops with this mount: say which other agents used it
    (their I/O now waits, then fails with EIO after their --fault-timeout)."""
    others = [f"{a.host}:{a.mount}" for a in service.agents.agents.values() if a.connected]
    if others:
        print(f"virtfs-mount: warning: this mount's embedded controller stops with it, and "
              f"{len(others)} other agent(s) still use it ({', '.join(sorted(others))}): "
              "their I/O now waits and then fails with EIO; run virtfs-controller on its "
              "own to keep them going", file=sys.stderr, flush=True)


def missing_patches() -> list[str]:
    """Which of virtfs's pyfuse3 patches (third_party/pyfuse3/: fallocate, lseek) the
    imported pyfuse3 lacks: both the Python default handler and the compiled callback
    must be there (third_party/pyfuse3/README.md)."""
    try:
        ext = Path(pyfuse3.__file__ or "").read_bytes()
    except OSError:
        ext = b""
    return [name for name in ("fallocate", "lseek")
            if not hasattr(pyfuse3.Operations, name)
            or f"fuse_{name}_async".encode() not in ext]


def _warn_if_not_empty(mountpoint: str) -> None:
    """Say on stderr that mounting hides what the directory holds (FUSE 3 mounts over
    a non-empty directory, as mount(8) does; fuse 2 refused without -o nonempty).
    Call it before mounting: after, listing it would wait on ourselves."""
    try:
        with os.scandir(mountpoint) as it:
            n = sum(1 for _ in it)
    except OSError:
        return  # the mount itself says what is wrong
    if n:
        print(f"virtfs-mount: warning: {mountpoint} is not empty: its {n} "
              f"entr{'y is' if n == 1 else 'ies are'} hidden while virtfs is mounted there",
              file=sys.stderr, flush=True)


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Raise the mount's read-ahead (the kernel's 128 KiB halves sequential reads).

    Found through /proc/self/mountinfo: stat()ing our own mountpoint before the FUSE
    loop runs would wait for ourselves. Best effort: it needs root.
    """
    try:
        m = fsutil.mount_at(mountpoint)
        if m is None:
            raise OSError(f"nothing mounted at {mountpoint}")
        with open(f"/sys/class/bdi/{m.major}:{m.minor}/read_ahead_kb", "w") as ra:
            ra.write(str(kb))
    except OSError as e:
        log.debug("cannot set read-ahead of %s: %s", mountpoint, e)


def set_max_background(mountpoint: str, n: int) -> None:
    """Let the kernel keep up to n background requests (read-ahead, async I/O) in flight
    on the mount (default 12), and set its congestion threshold to 3/4 of that.

    The FUSE connection is /sys/fs/fuse/connections/MINOR/ (the mount's device, found
    through /proc/self/mountinfo, as set_read_ahead). Best effort: it needs root and
    the fusectl file system; n <= 0 leaves the kernel's values.
    """
    if n <= 0:
        return
    try:
        m = fsutil.mount_at(mountpoint)
        if m is None:
            raise OSError(f"nothing mounted at {mountpoint}")
        conn = f"/sys/fs/fuse/connections/{m.minor}"
        # raise max_background first: the kernel caps the threshold at it
        with open(f"{conn}/max_background", "w") as f:
            f.write(str(n))
        with open(f"{conn}/congestion_threshold", "w") as f:
            f.write(str(max(1, n * 3 // 4)))
    except OSError as e:
        log.debug("cannot set max_background of %s: %s", mountpoint, e)


async def _goodbye(volumes: Volumes, io: ContainerIO) -> None:
    """Sync, close what is still open, and release our lease at the controller."""
    try:
        await io.sync()
    except OSError as e:
        log.error("final sync failed: %s", e)
    for od in list(volumes.ns.open.values()):
        od.handles = 1
        try:
            await volumes.release(od)
        except Exception as e:
            log.warning("closing %s: %s", od.name, e)
    try:
        await volumes.session.call("agent.bye", timeout=3.0, retry=False)
    except Exception as e:
        log.info("agent.bye: %s", e)


FUSE_CONF = "/etc/fuse.conf"


def user_allow_other(path: str = FUSE_CONF) -> bool:
    """Whether fuse.conf (fuse(8)) lets users other than root mount with allow_other:
    a line "user_allow_other" (comments after '#' and blanks ignored). fusermount3
    reads the same file and refuses the mount otherwise, with a message that names
    neither the option nor the file's line. False if the file cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="virtfs-mount",
        description="Mount virtfs: every virtual disk appears as a file in MOUNTPOINT. Runs in "
        "the foreground; stop it with Ctrl-C, SIGTERM or 'fusermount3 -u MOUNTPOINT'.",
    )
    p.add_argument("mountpoint")
    p.add_argument("--controller", metavar="ADDR",
                   help="controller address (unix:PATH or tcp://HOST:PORT), or a group's "
                   "addresses separated by commas (the agent follows the leader). Default: "
                   "the state dir's socket; if no controller answers there, an embedded one "
                   "is started")
    add_security_options(p)
    p.add_argument("--state-dir", help="state dir for the embedded controller and the default "
                   "socket (default $VIRTFS_STATE_DIR or ~/.local/state/virtfs)")
    p.add_argument("--default-container-size", default=DEFAULT_CONTAINER_SIZE, metavar="SIZE",
                   help=f"size of the sparse default container the embedded controller creates "
                   f"on first use (default {DEFAULT_CONTAINER_SIZE})")
    p.add_argument("--demo", action="store_true",
                   help=f"embedded controller: also create a {DEMO_SIZE >> 30} GiB thin disk "
                   f"{DEMO_DISK!r} if it does not exist")
    p.add_argument("--fault-timeout", type=seconds_arg, default=30.0, metavar="SECONDS",
                   help="how long I/O waits for the controller before failing with EIO "
                   "(default 30)")
    p.add_argument("--connect-timeout", type=seconds_arg, default=CONNECT_TIMEOUT,
                   metavar="SECONDS", help="with --controller: how long to wait for it to "
                   f"answer at start before exiting 1 (default {CONNECT_TIMEOUT:.0f})")
    p.add_argument("--lease", type=float, default=10.0, metavar="SECONDS",
                   help="agent lease of the embedded controller (default 10)")
    p.add_argument("--read-ahead-kb", type=int, default=1024, metavar="KB",
                   help="kernel read-ahead for the mount (default 1024; needs root)")
    p.add_argument("--max-background", type=int, default=MAX_BACKGROUND, metavar="N",
                   help="FUSE requests the kernel keeps in flight in the background "
                   f"(read-ahead, async I/O; default {MAX_BACKGROUND}, the kernel's 12; "
                   "needs root; 0 keeps the kernel's)")
    p.add_argument("--no-fast-path", action="store_true",
                   help="serve every read and write through the general data path (the "
                   "fast path for plain entries is off; also VIRTFS_FASTPATH=0)")
    p.add_argument("--fast-threads", type=int, default=None, metavar="N",
                   help="C threads that read FUSE requests and serve plain reads and "
                   "writes without "
                   f"Python (virtfs/cfast.py; default ${cfast.THREADS_ENV} or {FAST_THREADS};"
                   " 0: off, pyfuse3's loop reads every request)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (docs/metrics.md;"
                   " PORT 0 picks a free port, printed on stderr); with an embedded "
                   "controller, its metrics too")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users (e.g. qemu running as libvirt-qemu) open disks, as "
                   "each disk's owner, group and mode allow (docs/permissions.md); a user "
                   "other than root needs user_allow_other in /etc/fuse.conf")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    missing = missing_patches()
    if missing:
        print(f"virtfs-mount: error: the pyfuse3 at {pyfuse3.__file__} lacks virtfs's "
              f"{' and '.join(missing)} patch{'es' if len(missing) > 1 else ''} (discard, "
              "zero-range and SEEK_DATA/SEEK_HOLE would fail); install virtfs from its clone "
              "(pip install ., which builds third_party/pyfuse3; make setup does)", file=sys.stderr)
        return 1
    try:
        args.default_container_size = parse_size(args.default_container_size)
    except SizeError as e:
        p.error(f"--default-container-size: {e}")
    if args.default_container_size < 2 << 20:
        p.error("--default-container-size must be at least 2M (1M of it is the label's)")
    if not 0.5 <= args.lease <= 3600:
        p.error("--lease must be between 0.5 and 3600 seconds")
    if not 0 < args.fault_timeout <= 86400:
        p.error("--fault-timeout must be more than 0 seconds")
    if args.read_ahead_kb < 0:
        p.error("--read-ahead-kb must not be negative")
    if args.fast_threads is None:
        try:
            args.fast_threads = int(os.environ.get(cfast.THREADS_ENV, FAST_THREADS))
        except ValueError:
            p.error(f"${cfast.THREADS_ENV} must be a number of threads")
    if not 0 <= args.fast_threads <= 64:
        p.error("--fast-threads must be between 0 and 64")
    if not 0 <= args.max_background <= 65535:
        p.error("--max-background must be between 0 and 65535")
    if args.metrics is not None:
        try:
            metrics_http.parse_addr(args.metrics)
        except ValueError as e:
            p.error(str(e))
    args.security = None
    if args.controller is not None:
        try:
            split_addrs(args.controller)
            args.security = security_from_args(args, args.controller)
        except (ValueError, SecurityConfigError) as e:
            print(f"virtfs-mount: error: {e}", file=sys.stderr)
            return 2
    if args.allow_other and os.geteuid() != 0 and not user_allow_other():
        print(f"virtfs-mount: --allow-other needs 'user_allow_other' in {FUSE_CONF} for a "
              "user other than root (fuse(8)); add it, or mount as root", file=sys.stderr)
        return 1
    if not os.path.isdir(args.mountpoint):
        print(f"virtfs-mount: {args.mountpoint} is not a directory", file=sys.stderr)
        return 1
    if os.path.ismount(args.mountpoint):
        print(f"virtfs-mount: {args.mountpoint} is already a mount point", file=sys.stderr)
        return 1
    args.mountpoint = os.path.abspath(args.mountpoint)
    args.state_dir = os.path.abspath(args.state_dir or default_state_dir())
    known = (MountError, StateDirBusy, JournalCorrupt, RemoteError, OSError, ValueError)
    # until trio's receiver (_run) takes them, and again after it: a signal is noted,
    # not fatal, so a stop never dies half way (a SIGTERM just after fusermount3 -u -z)
    signal.signal(signal.SIGINT, _note_signal)
    signal.signal(signal.SIGTERM, _note_signal)
    try:
        return _run_trio(args, known)
    finally:
        # done: a signal from now on must not kill the exit half way (143). Ignored,
        # not noted: Python's finalization resets noted handlers to the default.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _run_trio(args: argparse.Namespace, known: tuple[type[BaseException], ...]) -> int:
    """trio.run(_run); the exit code, with a known error said in one line."""
    try:
        trio.run(_run, args)
    except known as e:
        print(f"virtfs-mount: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as eg:
        leaf = single_leaf(eg)
        if isinstance(leaf, known):
            print(f"virtfs-mount: {getattr(leaf, 'message', None) or leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        raise
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

