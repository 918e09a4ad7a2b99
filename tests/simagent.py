"""A minimal simulated agent for controller-level reproducers: keeps a real
virtfs.mapcache.DiskTable per open disk, applies pushes (update) and acks them,
and does 'I/O' directly on the container files through its table."""
from __future__ import annotations

import os
from typing import Any

import trio

from controller.client import open_controller
from controller.protocol import ERROR, INVALID, NOWRITE, ZERO
from virtfs.mapcache import DiskTable

BS = 4096
SEG = 4 << 20


class SimAgent:
    def __init__(self, name: str):
        self.name = name
        self.tables: dict[str, DiskTable] = {}
        self.paths: dict[int, str] = {}
        self.pushes: list[dict[str, Any]] = []
        self.client: Any = None
        self.nursery: Any = None

    async def on_push(self, msg: dict[str, Any]) -> None:
        self.pushes.append(msg)

        async def handle() -> None:
            if msg.get("push") == "update":
                t = self.tables.get(msg["disk"])
                if t is not None:
                    t.replace(msg["start"], msg["end"], msg["rows"], size=msg["size"],
                              epoch=msg["epoch"], version=msg.get("v"))
            if "pid" in msg:
                await self.client.call("agent.ack", pid=msg["pid"], timeout=20)
        self.nursery.start_soon(handle)

    async def open(self, disk: str) -> None:
        t = await self.client.call("disk.open", name=disk)
        self.paths.update({int(k): v for k, v in t["containers"].items()})
        self.tables[disk] = DiskTable(disk, t["size"], t["epoch"], t["rows"], t.get("v", 0))

    async def fault(self, disk: str, off: int, length: int, write: bool) -> dict[str, Any]:
        r = await self.client.call("disk.fault", name=disk, offset=off, length=length,
                                   write=write, timeout=60)
        self.paths.update({int(k): v for k, v in r["containers"].items()})
        rows = r["rows"]
        if rows:
            self.tables[disk].replace(rows[0][0], rows[-1][0] + rows[-1][1], rows,
                                      size=r["size"], epoch=r["epoch"], version=r.get("v"))
        return r

    def entry(self, disk: str, pos: int):
        return self.tables[disk].pieces(pos, 1)[0]

    def can_write(self, disk: str, off: int, n: int) -> bool:
        return all(not e.flags & (ZERO | NOWRITE | INVALID | ERROR)
                   for e in self.tables[disk].pieces(off, n))

    def can_read(self, disk: str, off: int, n: int) -> bool:
        return all(not e.flags & (INVALID | ERROR) for e in self.tables[disk].pieces(off, n))

    def pwrite(self, disk: str, off: int, data: bytes) -> None:
        """Write through the table, like datapath.write, only where entries allow it."""
        assert self.can_write(disk, off, len(data)), (self.name, off,
                                                      self.tables[disk].pieces(off, len(data)))
        for e in self.tables[disk].pieces(off, len(data)):
            fd = os.open(self.paths[e.lun], os.O_RDWR)
            try:
                os.pwrite(fd, data[e.vstart - off: e.vend - off], e.offset)
            finally:
                os.close(fd)

    def pread(self, disk: str, off: int, n: int) -> bytes:
        assert self.can_read(disk, off, n), (self.name, self.tables[disk].pieces(off, n))
        out = []
        for e in self.tables[disk].pieces(off, n):
            if e.flags & ZERO:
                out.append(bytes(e.length))
                continue
            fd = os.open(self.paths[e.lun], os.O_RDONLY)
            try:
                out.append(os.pread(fd, e.length, e.offset))
            finally:
                os.close(fd)
        return b"".join(out)


class agent_ctx:
    """A registered SimAgent for the block. renew: it renews its lease (agent.heartbeat
    every RENEW_EVERY seconds) as a real agent does, so a test slower than a lease (a
    loaded machine) keeps it; else its lease runs out a lease after registering (for
    tests of what the controller does with an agent that went silent)."""

    RENEW_EVERY = 0.5

    def __init__(self, addr: str, name: str, nursery: Any, renew: bool = False):
        self.addr, self.a, self.nursery, self.renew = addr, SimAgent(name), nursery, renew
        self.scope = trio.CancelScope()

    async def __aenter__(self) -> SimAgent:
        self.cm = open_controller(self.addr, role="agent", on_push=self.a.on_push)
        self.a.client = await self.cm.__aenter__()
        self.a.nursery = self.nursery
        await self.a.client.call("agent.register", name=self.a.name, host="h", mount="/m")
        if self.renew:
            self.nursery.start_soon(self._renew)
        return self.a

    async def _renew(self) -> None:
        with self.scope:
            while True:
                await trio.sleep(self.RENEW_EVERY)
                await self.a.client.call("agent.heartbeat")

    async def __aexit__(self, *exc: Any) -> None:
        self.scope.cancel()
        await self.cm.__aexit__(*exc)


def pattern(tag: int, n: int) -> bytes:
    return bytes([tag & 0xFF]) * n


def read_file(path: str, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def write_file(path: str, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
