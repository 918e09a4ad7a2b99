"""etcd v3's JSON gateway shapes: typed results, txn parts, errors (pure; no I/O).

etcd serves its gRPC API as JSON too (grpc-gateway: ``POST /v3/kv/range`` and so on;
the messages of ``api/etcdserverpb/rpc.proto`` and ``api/mvccpb/kv.proto``). Three rules
of that encoding shape this module:

- bytes fields (keys, values) are base64 (standard alphabet);
- 64-bit integers (revisions, lease ids, TTLs) come as JSON strings, and we send them so;
- a field at its default (0, false, empty, the first enum value such as ``PUT``/``EQUAL``)
  is left out of a response, so every field is read with a default.

etcd 3.4 and 3.5 name fields as the .proto does (``create_revision``); a gateway that
uses protojson's default names (``createRevision``) is read as well, and enum values
are accepted as names or numbers, so a later etcd's marshaller options do not break us.
The client that sends these is controller/etcd.py.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Literal

# ---------------------------------------------------------------- errors

# gRPC status codes (google.golang.org/grpc/codes) that mean "try again, maybe elsewhere":
# etcd answers UNAVAILABLE for "no leader", "leader changed", "request timed out".
GRPC_NOT_FOUND = 5
GRPC_DEADLINE_EXCEEDED = 4
GRPC_UNAVAILABLE = 14
UNAVAILABLE_CODES = frozenset({GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE})


class EtcdError(Exception):
    """Any failure of an etcd request; str() is one line naming the endpoint."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered, or the one that did has no quorum (gRPC UNAVAILABLE or
    DEADLINE_EXCEEDED). For a write, its outcome is unknown: it may have been applied."""


class EtcdRefused(EtcdError):
    """etcd answered and refused the request (bad argument, unknown lease, ...).

    code: the gRPC status code etcd gave (0 if none); the message is etcd's own."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class LeaseNotFound(EtcdRefused):
    """The lease does not exist (any more): it expired or was revoked."""


class WatchCompacted(EtcdRefused):
    """A watch asked for history etcd has compacted away; ``compact_revision`` is the
    oldest revision still kept, so a reader must re-read the current state instead."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message, code=11)  # OUT_OF_RANGE, as etcd's gRPC API says it
        self.compact_revision = compact_revision


def refused(where: str, code: int, message: str) -> EtcdError:
    """The error for a non-OK gateway answer: unavailable, lease not found, or refused."""
    text = f"etcd {where}: {message or f'gRPC code {code}'}"
    if code in UNAVAILABLE_CODES:
        return EtcdUnavailable(text)
    if code == GRPC_NOT_FOUND and "lease not found" in message:
        return LeaseNotFound(text, code)
    return EtcdRefused(text, code)


def error_of(where: str, data: Any) -> EtcdError | None:
    """The error a decoded gateway body carries, or None.

    Unary calls answer ``{"error": "...", "code": N, "message": "..."}``; streams put
    ``{"error": {"grpc_code": N, "message": "..."}}`` in their line."""
    if not isinstance(data, dict) or "error" not in data:
        return None
    err = data["error"]
    if isinstance(err, dict):
        return refused(where, _int(err.get("grpc_code", err.get("code", 0))),
                       str(err.get("message", "")))
    return refused(where, _int(data.get("code", 0)), str(data.get("message") or err))


# ---------------------------------------------------------------- encoding


def to_bytes(key: bytes | str) -> bytes:
    """A key or value as bytes: str is UTF-8."""
    return key.encode() if isinstance(key, str) else bytes(key)


def b64(data: bytes | str) -> str:
    return base64.b64encode(to_bytes(data)).decode("ascii")


def unb64(text: Any) -> bytes:
    """Bytes from a reply's base64 (standard or URL-safe, padded or not); "" and None
    are b"" (an omitted empty field). Raises EtcdError on anything else."""
    if not text:
        return b""
    s = str(text)
    s += "=" * (-len(s) % 4)
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s)
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise EtcdError(f"etcd: not base64 in a reply: {s[:40]!r}") from None


def prefix_end(prefix: bytes | str) -> bytes:
    """The range_end that makes [prefix, end) every key starting with prefix (etcd's
    GetPrefixRangeEnd): the prefix with its last byte below 0xff incremented, or
    b"\\0" (every key >= prefix) when there is no such byte."""
    p = bytearray(to_bytes(prefix))
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"
    p[-1] += 1
    return bytes(p)


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        raise EtcdError(f"etcd: not an integer in a reply: {v!r}") from None


def _field(d: dict[str, Any], name: str, default: Any = None) -> Any:
    """d[name], or its protojson camelCase spelling, or default."""
    if name in d:
        return d[name]
    head, *rest = name.split("_")
    return d.get(head + "".join(w.title() for w in rest), default)


def _header_revision(d: dict[str, Any]) -> int:
    return _int((d.get("header") or {}).get("revision"))


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd keeps it (mvccpb.KeyValue). Revisions are etcd's store revisions,
    which only grow; version counts puts since the key's creation; lease 0 = none."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeyValue:
        return cls(key=unb64(d.get("key")), value=unb64(d.get("value")),
                   create_revision=_int(_field(d, "create_revision")),
                   mod_revision=_int(_field(d, "mod_revision")),
                   version=_int(d.get("version")), lease=_int(d.get("lease")))


@dataclass(frozen=True)
class RangeResponse:
    """A range read: the keys found (sorted by key), how many matched, whether a limit
    cut the list (more), and the store revision it was read at (revision)."""

    revision: int
    kvs: tuple[KeyValue, ...]
    count: int
    more: bool

    @property
    def kv(self) -> KeyValue | None:
        """The first key found, or None: the answer to a single-key get."""
        return self.kvs[0] if self.kvs else None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RangeResponse:
        return cls(revision=_header_revision(d),
                   kvs=tuple(KeyValue.from_json(k) for k in d.get("kvs") or ()),
                   count=_int(d.get("count")), more=bool(d.get("more")))


@dataclass(frozen=True)
class PutResponse:
    """A put: the revision it made, and the key's previous state if asked (prev_kv)."""

    revision: int
    prev_kv: KeyValue | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PutResponse:
        prev = _field(d, "prev_kv")
        return cls(_header_revision(d), KeyValue.from_json(prev) if prev else None)


@dataclass(frozen=True)
class DeleteResponse:
    """A delete: how many keys went, at which revision, and what they held if asked."""

    revision: int
    deleted: int
    prev_kvs: tuple[KeyValue, ...]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeleteResponse:
        return cls(_header_revision(d), _int(d.get("deleted")),
                   tuple(KeyValue.from_json(k) for k in _field(d, "prev_kvs") or ()))


OpResponse = RangeResponse | PutResponse | DeleteResponse


@dataclass(frozen=True)
class TxnResponse:
    """A txn: whether every compare held (succeeded), and the answers of the branch
    that ran, one per op in order, at the txn's revision."""

    revision: int
    succeeded: bool
    responses: tuple[OpResponse, ...]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TxnResponse:
        out: list[OpResponse] = []
        for r in d.get("responses") or ():
            if (x := _field(r, "response_range")) is not None:
                out.append(RangeResponse.from_json(x))
            elif (x := _field(r, "response_put")) is not None:
                out.append(PutResponse.from_json(x))
            elif (x := _field(r, "response_delete_range")) is not None:
                out.append(DeleteResponse.from_json(x))
            else:
                raise EtcdError(f"etcd: unknown txn response {sorted(r)}")
        return cls(_header_revision(d), bool(d.get("succeeded")), tuple(out))


@dataclass(frozen=True)
class Lease:
    """A granted lease: its id and TTL (seconds; etcd may grant more than asked)."""

    id: int
    ttl: int


@dataclass(frozen=True)
class LeaseInfo:
    """A lease's time to live: ttl seconds left (-1: expired or revoked), the TTL it
    was granted, and the keys attached to it (when asked)."""

    id: int
    ttl: int
    granted_ttl: int
    keys: tuple[bytes, ...]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LeaseInfo:
        return cls(_int(d.get("ID")), _int(d.get("TTL")), _int(_field(d, "grantedTTL")),
                   tuple(unb64(k) for k in d.get("keys") or ()))


@dataclass(frozen=True)
class Event:
    """One change a watch saw: type "PUT" or "DELETE", the key after it (for DELETE,
    only key and mod_revision, the revision of the delete), and before it if asked."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None

    @property
    def revision(self) -> int:
        """The store revision of this change."""
        return self.kv.mod_revision

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Event:
        t = d.get("type", "PUT")
        prev = _field(d, "prev_kv")
        return cls("DELETE" if t in ("DELETE", 1) else "PUT", KeyValue.from_json(d["kv"]),
                   KeyValue.from_json(prev) if prev else None)


@dataclass(frozen=True)
class WatchResponse:
    """One message of a watch stream: created (the watch is set up, at revision),
    canceled (with compact_revision > 0 when its start was compacted), or events; a
    message with none of these is a progress notice (nothing more up to revision)."""

    revision: int
    created: bool
    canceled: bool
    compact_revision: int
    cancel_reason: str
    events: tuple[Event, ...]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WatchResponse:
        return cls(_header_revision(d), bool(d.get("created")), bool(d.get("canceled")),
                   _int(_field(d, "compact_revision")), str(_field(d, "cancel_reason", "")),
                   tuple(Event.from_json(e) for e in d.get("events") or ()))


# ---------------------------------------------------------------- txn parts

CompareTarget = Literal["version", "create_revision", "mod_revision", "value", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]
_TARGETS = {"version": "VERSION", "create_revision": "CREATE", "mod_revision": "MOD",
            "value": "VALUE", "lease": "LEASE"}
_RESULTS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


@dataclass(frozen=True)
class Compare:
    """One guard of a txn: ``target(key) op operand``. create_revision 0 means the key
    does not exist; operand is bytes for "value", an int otherwise. Raises ValueError."""

    key: bytes | str
    target: CompareTarget
    op: CompareOp
    operand: int | bytes | str

    def __post_init__(self) -> None:
        if self.target not in _TARGETS:
            raise ValueError(f"compare target must be one of {sorted(_TARGETS)}")
        if self.op not in _RESULTS:
            raise ValueError(f"compare op must be one of {sorted(_RESULTS)}")
        if (self.target == "value") != isinstance(self.operand, bytes | str):
            raise ValueError(f"compare on {self.target}: operand must be "
                             + ("bytes" if self.target == "value" else "an int"))

    def to_json(self) -> dict[str, Any]:
        operand = (b64(self.operand) if isinstance(self.operand, bytes | str)
                   else str(self.operand))
        return {"key": b64(self.key), "target": _TARGETS[self.target],
                "result": _RESULTS[self.op], self.target: operand}


@dataclass(frozen=True)
class OpGet:
    """A txn op reading key, or every key under it with prefix=True."""

    key: bytes | str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_range": range_body(self.key, self.prefix)}


@dataclass(frozen=True)
class OpPut:
    """A txn op writing key = value, attached to lease (0: none)."""

    key: bytes | str
    value: bytes | str
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"request_put": put_body(self.key, self.value, self.lease)}


@dataclass(frozen=True)
class OpDelete:
    """A txn op deleting key, or every key under it with prefix=True."""

    key: bytes | str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_delete_range": range_body(self.key, self.prefix)}


Op = OpGet | OpPut | OpDelete


def range_body(key: bytes | str, prefix: bool = False) -> dict[str, Any]:
    """{"key"[, "range_end"]} for one key, or every key under it with prefix=True."""
    body = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    return body


def put_body(key: bytes | str, value: bytes | str, lease: int = 0,
             prev_kv: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    if prev_kv:
        body["prev_kv"] = True
    return body


def txn_body(compares: list[Compare], success: list[Op],
             failure: list[Op]) -> dict[str, Any]:
    return {"compare": [c.to_json() for c in compares],
            "success": [o.to_json() for o in success],
            "failure": [o.to_json() for o in failure]}
