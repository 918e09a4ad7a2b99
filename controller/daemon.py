"""virtfs-controller: lock the state dir, replay, serve, checkpoint on the way out."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from . import __version__, metrics_http, sdnotify
from .adoption import refuse_group_dir
from .agents import DEFAULT_LEASE
from .cli_args import size_arg
from .client import single_leaf
from .etcd import etcd_security, parse_endpoints
from .frames import JournalCorrupt  # virtfs.mount's too
from .group import DEFAULT_GROUP, GroupConfig, GroupTerm, lead_for_ever, open_group
from .groupmetrics import GroupMetrics
from .grouprecovery import GroupRecovery
from .groupstore import open_group_journal
from .journal import Journal
from .metrics import ControllerMetrics
from .recovery import Recovery, recover
from .server import MAX_CONNECTIONS, TCP_NEEDS, Server, serve_listeners
from .service import Service
from .statedir import StateDirBusy, default_socket, default_state_dir, lock_state_dir
from .transport import SecurityConfigError, ServerSecurity, parse_addr, server_security

log = logging.getLogger("virtfs.controller")

# s: a group leader's etcd lease. A failover (kill -9 to the first write served) took
# 2.6 s with it (p99 of 20, bench.run failover), inside the agents' 10 s lease; 5.6 s
# with 5 s
DEFAULT_ETCD_TTL = 2


@asynccontextmanager
async def open_controller_service(state_dir: str, listen: list[str] | None = None, *,
                                  checkpoint_bytes: int | None = None,
                                  lease: float = DEFAULT_LEASE,
                                  security: ServerSecurity | None = None,
                                  max_connections: int = MAX_CONNECTIONS,
                                  metrics: CollectorRegistry | None = None,
                                  group: GroupTerm | None = None,
                                  copy_rate: int = 0,
                                  lazy_marks: bool = False,
                                  ) -> AsyncIterator[Service]:
    """Run a controller (journal committer + listeners) for the block's duration.

    Used by the daemon and by the agent's embedded mode. security: TLS context and
    token for tcp:// listeners (required if there are any: ValueError otherwise).
    metrics: a registry to add the controller's metrics to (the caller serves it).
    group: the leader of a controller group serves in this term (controller/group.py):
    no listeners of its own (the member's server dispatches to Service.dispatch), no
    state dir lock (the term's token fences, docs/ha.md; only the first term takes it
    while it adopts a standalone's journal, controller/adoption.py), and once the term
    has ended nothing more is written at the stop (no checkpoint, the agents' marker
    kept). Without group, StateDirBusy if state_dir holds a group's files.
    """
    lock_fd = lock_state_dir(state_dir) if group is None else -1
    try:
        kw: dict[str, Any] = {}
        if checkpoint_bytes is not None:
            kw["checkpoint_bytes"] = checkpoint_bytes
        rec: Recovery | GroupRecovery
        if group is None:
            refuse_group_dir(state_dir)  # a group's state is past what its files say
            local = recover(state_dir)
            if local.truncated_at is not None:
                log.warning("journal: torn tail at offset %d dropped (%d bytes)",
                            local.truncated_at, local.dropped_bytes)
            journal = Journal(state_dir, local.state, journal_bytes=local.journal_bytes, **kw)
            rec = local
        else:
            # the head in etcd says what counts; this term writes files of its own
            journal, rec = await open_group_journal(state_dir, group.election, group.term,
                                                    await group.recovered(), **kw)
            if rec.ignored:
                log.warning("journal: %d frames past their term's head ignored (written "
                            "by a deposed leader, never acknowledged)", rec.ignored)
        log.info("state dir %s: seq %d, %d records replayed, %d disks, %d containers",
                 state_dir, rec.state.seq, rec.records, len(rec.state.disks),
                 len(rec.state.containers))
        service = Service(rec.state, journal, state_dir, lease=lease, copy_rate=copy_rate,
                          lazy_marks=lazy_marks)
        if group is not None:
            service.ctx.may_write = group.may_write
        cm = ControllerMetrics(metrics, service) if metrics is not None else None
        if cm is not None:
            service.serve = cm.wrap(service.dispatch)
        server = Server(service.serve, security=security, max_connections=max_connections)
        addrs = (listen or [default_socket(state_dir)]) if group is None else []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run)
                await service.start()
                await nursery.start(service.run_jobs)
                if cm is not None:
                    nursery.start_soon(cm.run)
                if addrs:
                    await nursery.start(serve_listeners, server, addrs)
                yield service
                nursery.cancel_scope.cancel()
            if group is None or group.leads():
                service.agents.shutdown()
                # a clean stop: everything queued was committed; checkpoint for a fast start
                if journal.durable_seq == rec.state.seq:
                    journal.checkpoint_now_sync()
        finally:
            if cm is not None:
                cm.close()  # a group member's registry outlives the term
            journal.close()
            for addr in addrs:
                if addr.startswith("unix:"):
                    try:
                        os.unlink(addr[5:])
                    except FileNotFoundError:
                        pass
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)


async def _run(state_dir: str, listen: list[str], lease: float,
               security: ServerSecurity | None = None,
               max_connections: int = MAX_CONNECTIONS, metrics: str | None = None,
               copy_rate: int = 0, lazy_marks: bool = False) -> None:
    registry = metrics_http.new_registry() if metrics is not None else None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with open_controller_service(state_dir, listen, lease=lease, security=security,
                                           max_connections=max_connections,
                                           metrics=registry, copy_rate=copy_rate,
                                           lazy_marks=lazy_marks):
            if metrics is not None and registry is not None:
                host, port = metrics_http.serve(metrics, registry)
                print(f"virtfs-controller: metrics at http://{host}:{port}/metrics",
                      file=sys.stderr, flush=True)
            serving = f"serving {', '.join(listen)} (state dir {state_dir})"
            print(f"virtfs-controller: {serving}", file=sys.stderr, flush=True)
            # every listener is bound and listening: a Type=notify unit is up
            sdnotify.notify("READY=1", f"STATUS={serving}")
            async for sig in signals:
                log.info("signal %d: shutting down", sig)
                sdnotify.notify("STOPPING=1", "STATUS=stopping (checkpoint)")
                break


async def _run_group(cfg: GroupConfig, state_dir: str, listen: list[str], lease: float,
                     security: ServerSecurity | None, max_connections: int,
                     metrics: str | None = None, copy_rate: int = 0,
                     lazy_marks: bool = False) -> None:
    """A member of a controller group (controller/group.py) until SIGINT/SIGTERM/SIGHUP:
    a standby that answers not_leader until elected, then the leader, and a standby
    again if its term ends. A clean stop resigns, so another member takes over at once.
    metrics: HOST:PORT to serve the member's metrics at for its whole life (its own,
    controller/groupmetrics.py, and its service's while it leads)."""
    registry = metrics_http.new_registry() if metrics is not None else None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with open_group(cfg) as (election, member):
            member.state_dir = state_dir
            server = Server(member.dispatch, security=security,
                            max_connections=max_connections, leader=member.leadership,
                            term=member.term_token)
            gm = GroupMetrics(registry, member) if registry is not None else None

            async def serve(gt: GroupTerm) -> None:
                async with open_controller_service(state_dir, lease=lease, group=gt,
                                                   metrics=registry,
                                                   copy_rate=copy_rate,
                                                   lazy_marks=lazy_marks) as svc:
                    journal = svc.journal
                    member.serving(gt, svc.serve, lambda: journal.durable_seq)
                    status = (f"leading group {cfg.group} (term {gt.term.token}), serving "
                              f"{', '.join(listen)}")
                    print(f"virtfs-controller: {status}", file=sys.stderr, flush=True)
                    sdnotify.notify(f"STATUS={status}")
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                await nursery.start(serve_listeners, server, listen)
                if metrics is not None and registry is not None and gm is not None:
                    nursery.start_soon(gm.run)
                    host, port = metrics_http.serve(metrics, registry)
                    print(f"virtfs-controller: metrics at http://{host}:{port}/metrics",
                          file=sys.stderr, flush=True)
                standby = (f"member {election.member_id} of group {cfg.group} (etcd "
                           f"{cfg.etcd}), listening on {', '.join(listen)}; a standby "
                           "until elected")
                print(f"virtfs-controller: {standby}", file=sys.stderr, flush=True)
                sdnotify.notify("READY=1", f"STATUS={standby}")
                nursery.start_soon(lead_for_ever, election, member, serve, server.abort_all)
                async for sig in signals:
                    log.info("signal %d: shutting down", sig)
                    sdnotify.notify("STOPPING=1", "STATUS=stopping (resigning)")
                    break
                nursery.cancel_scope.cancel()


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx (the etcd client's) logs every request at INFO
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


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
                   help="unix:PATH (default unix:STATE_DIR/controller.sock) or "
                   "tcp://HOST:PORT (needs --tls-cert, --tls-key and --token-file); may repeat")
    p.add_argument("--tls-cert", metavar="FILE",
                   help="tcp://: the controller's certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="tcp://: the key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="tcp://: require client certificates signed by this CA")
    p.add_argument("--token-file", metavar="FILE",
                   help="tcp://: a file (mode 0600) with the shared token clients must send "
                   "(make one: openssl rand -hex 32 > FILE)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                   help=f"connections open at once, all listeners (default {MAX_CONNECTIONS})")
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE, metavar="SECONDS",
                   help=f"agent lease (default {DEFAULT_LEASE:.0f} s): how long an agent that "
                   "lost the controller keeps using its cached entries")
    p.add_argument("--copy-rate", type=size_arg, default=0, metavar="SIZE",
                   help="the default limit of a migration's or drain's copy, bytes per "
                   "second (50M; default 0: none); vdctl disk migrate --rate overrides it")
    p.add_argument("--lazy-marks", action="store_true",
                   help="answer a first write to a moving or shared segment before its copy "
                   "and mark are flushed: the writer's fsync flushes them, and fails with "
                   "EIO if a controller crash lost them (docs/movement.md, \"Durable at "
                   "fsync\"); default: flushed before the answer")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics "
                   "(docs/metrics.md; PORT 0 picks a free port, printed on stderr)")
    g = p.add_argument_group("a controller group on etcd (docs/ha.md)")
    g.add_argument("--etcd", metavar="URL[,URL...]",
                   help="join a group of controllers on this etcd cluster (its client "
                   "URLs): one leads, the others are standbys; the state dir must be "
                   "one all of them share, and --listen must be given")
    g.add_argument("--group", default=DEFAULT_GROUP, metavar="NAME",
                   help=f"the group's name: its keys in etcd live under /virtfs/NAME/ "
                   f"(default {DEFAULT_GROUP})")
    g.add_argument("--advertise", metavar="ADDR",
                   help="the address clients reach this member at, which standbys name "
                   "when it leads (default: the first --listen)")
    g.add_argument("--member-id", metavar="ID",
                   help="this member's name in the group (default HOST/ADVERTISE)")
    g.add_argument("--etcd-ttl", type=int, default=DEFAULT_ETCD_TTL, metavar="SECONDS",
                   help="the leader's etcd lease: a dead leader is replaced within about "
                   f"this (default {DEFAULT_ETCD_TTL}; at least 2, and less than --lease, "
                   "so agents keep their leases across a failover)")
    g.add_argument("--etcd-ca", metavar="FILE", help="https:// etcd: the CA of its members "
                   "(default the system's)")
    g.add_argument("--etcd-cert", metavar="FILE",
                   help="https:// etcd: this controller's client certificate")
    g.add_argument("--etcd-key", metavar="FILE", help="the key of --etcd-cert")
    g.add_argument("--etcd-user", metavar="NAME", help="etcd user (etcd's authentication)")
    g.add_argument("--etcd-password-file", metavar="FILE",
                   help="a file whose first line is --etcd-user's password")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    state_dir = os.path.abspath(args.state_dir or default_state_dir())
    listen = args.listen or [default_socket(state_dir)]
    kinds = set()
    for addr in listen:  # before the state dir is touched
        try:
            kind, where = parse_addr(addr)
        except ValueError as e:
            p.error(str(e))
        kinds.add(kind)
        d = os.path.dirname(os.path.abspath(where))
        if kind == "unix" and d != state_dir and not os.path.isdir(d):
            # never create it: a typo would leave a socket where no client looks
            print(f"virtfs-controller: error: --listen {addr}: no directory {d} "
                  "(create it first)", file=sys.stderr)
            return 2
    group = None
    if args.etcd is not None:
        if not args.listen:
            p.error("--etcd needs --listen (each member of a group listens where its own "
                    "--listen says)")
        advertise = args.advertise or listen[0]
        try:
            parse_addr(advertise)
            group = GroupConfig(args.etcd, advertise, args.group, args.member_id or "",
                                etcd_security(ca=args.etcd_ca, cert=args.etcd_cert,
                                              key=args.etcd_key, user=args.etcd_user,
                                              password_file=args.etcd_password_file),
                                ttl=args.etcd_ttl)
            if not 2 <= args.etcd_ttl < args.lease:
                raise ValueError(f"--etcd-ttl must be at least 2 and less than --lease "
                                 f"({args.lease:g})")
            parse_endpoints(args.etcd)
        except ValueError as e:
            p.error(str(e))
    elif args.etcd_ttl != DEFAULT_ETCD_TTL or any((
            args.advertise, args.member_id, args.etcd_ca, args.etcd_cert, args.etcd_key,
            args.etcd_user, args.etcd_password_file)):
        p.error("--advertise, --member-id and the --etcd-* options need --etcd")
    if not 1 <= args.max_connections <= 1 << 20:
        p.error("--max-connections must be between 1 and 1048576")
    security = None
    tls_opts = (args.tls_cert, args.tls_key, args.tls_ca, args.token_file)
    if "tcp" in kinds or any(tls_opts):
        # TCP always needs TLS and a token, loopback too: another local user could
        # connect to a loopback port, and SO_PEERCRED says nothing about TCP peers
        if not (args.tls_cert and args.token_file):
            print(f"virtfs-controller: error: {TCP_NEEDS}", file=sys.stderr)
            return 2
        try:
            security = server_security(args.tls_cert, args.tls_key, args.token_file,
                                       args.tls_ca)
        except SecurityConfigError as e:
            print(f"virtfs-controller: error: {e}", file=sys.stderr)
            return 2
    try:
        if not 0.5 <= args.lease <= 3600:
            p.error("--lease must be between 0.5 and 3600 seconds")
        if args.metrics is not None:
            try:
                metrics_http.parse_addr(args.metrics)
            except ValueError as e:
                p.error(str(e))
        if group is not None:
            trio.run(_run_group, group, state_dir, listen, args.lease, security,
                     args.max_connections, args.metrics, args.copy_rate, args.lazy_marks)
        else:
            trio.run(_run, state_dir, listen, args.lease, security, args.max_connections,
                     args.metrics, args.copy_rate, args.lazy_marks)
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
