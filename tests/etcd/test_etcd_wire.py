"""controller/etcdwire.py alone (no etcd needed): replies as etcd 3.4.23's gateway sent
them (captured with curl), the same in protojson's other spelling, errors, and what we
send."""

from __future__ import annotations

import json

import pytest

from controller.etcdwire import (
    Compare,
    EtcdError,
    EtcdRefused,
    EtcdUnavailable,
    KeyValue,
    LeaseInfo,
    LeaseNotFound,
    OpDelete,
    OpGet,
    OpPut,
    RangeResponse,
    TxnResponse,
    WatchResponse,
    error_of,
    txn_body,
    unb64,
)

HEADER = {"cluster_id": "15118495548433857066", "member_id": "13668033151171901709",
          "revision": "2", "raft_term": "2"}


def test_replies_as_etcd_34_sends_them() -> None:
    r = RangeResponse.from_json(json.loads(
        '{"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709",'
        '"revision":"2","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2",'
        '"mod_revision":"2","version":"1","value":"Zm9v"}],"count":"1"}'))
    assert r == RangeResponse(2, (KeyValue(b"foo", b"foo", 2, 2, 1, 0),), 1, False)
    empty = RangeResponse.from_json({"header": HEADER})  # no key: kvs and count left out
    assert empty.kv is None and empty.count == 0
    # a failed txn: "succeeded" is left out (false is the default)
    t = TxnResponse.from_json(json.loads(
        '{"header":{"revision":"2"},"responses":[{"response_range":{"header":{"revision":'
        '"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1",'
        '"value":"Zm9v"}],"count":"1"}}]}'))
    assert not t.succeeded and t.responses[0].kv.value == b"foo"  # type: ignore[union-attr]
    t2 = TxnResponse.from_json({"header": {"revision": "7"}, "succeeded": True, "responses": [
        {"response_put": {"header": {"revision": "7"}}},
        {"response_delete_range": {"header": {"revision": "7"}, "deleted": "2"}}]})
    assert t2.succeeded and t2.responses[0].revision == 7
    assert t2.responses[1].deleted == 2  # type: ignore[union-attr]
    with pytest.raises(EtcdError, match="unknown txn response"):
        TxnResponse.from_json({"responses": [{"response_txn": {}}]})
    # a lease gone: TTL -1, grantedTTL left out
    assert LeaseInfo.from_json({"header": HEADER, "ID": "12345", "TTL": "-1"}) == LeaseInfo(
        12345, -1, 0, ())
    # a watch: created, then events (type left out for PUT), then canceled by compaction
    w = WatchResponse.from_json({"header": HEADER, "created": True})
    assert w.created and w.revision == 2 and not w.events
    w = WatchResponse.from_json(json.loads(
        '{"header":{"revision":"3"},"events":[{"kv":{"key":"Zm9v","create_revision":"2",'
        '"mod_revision":"2","version":"1","value":"Zm9v"}},{"type":"DELETE","kv":{"key":'
        '"Zm9v","mod_revision":"3"},"prev_kv":{"key":"Zm9v","create_revision":"2",'
        '"mod_revision":"2","version":"1","value":"Zm9v"}}]}'))
    assert [(e.type, e.revision) for e in w.events] == [("PUT", 2), ("DELETE", 3)]
    assert w.events[1].prev_kv is not None and w.events[1].prev_kv.value == b"foo"
    w = WatchResponse.from_json({"header": {"raft_term": "2"}, "canceled": True,
                                 "compact_revision": "4"})
    assert w.canceled and w.compact_revision == 4


def test_protojson_default_spelling_is_read_too() -> None:
    # camelCase names, enum numbers, and defaults emitted rather than left out
    kv = KeyValue.from_json({"key": "YQ==", "value": "", "createRevision": "5",
                             "modRevision": "6", "version": "2", "lease": "0"})
    assert kv == KeyValue(b"a", b"", 5, 6, 2, 0)
    w = WatchResponse.from_json({"header": {"revision": "6"}, "created": False,
                                 "canceled": False, "compactRevision": "0", "events": [
                                     {"type": 1, "kv": {"key": "YQ==", "modRevision": "6"},
                                      "prevKv": None}, {"type": 0, "kv": {"key": "YQ=="}}]})
    assert [e.type for e in w.events] == ["DELETE", "PUT"]
    t = TxnResponse.from_json({"succeeded": True, "responses": [
        {"responseDeleteRange": {"deleted": "1", "prevKvs": []}}]})
    assert t.responses[0].deleted == 1  # type: ignore[union-attr]
    assert unb64("-_8=") == unb64("+/8=") == b"\xfb\xff"
    with pytest.raises(EtcdError, match="not base64"):
        unb64("a*b")
    with pytest.raises(EtcdError, match="not an integer"):
        KeyValue.from_json({"version": "many"})


def test_errors() -> None:
    unary = {"error": "etcdserver: requested lease not found", "code": 5,
             "message": "etcdserver: requested lease not found"}
    e = error_of("http://h:1/v3/lease/revoke", unary)
    assert isinstance(e, LeaseNotFound) and e.code == 5
    assert str(e) == "etcd http://h:1/v3/lease/revoke: etcdserver: requested lease not found"
    bad = error_of("x", {"error": "illegal base64 data at input byte 0", "code": 3,
                         "message": "illegal base64 data at input byte 0"})
    assert type(bad) is EtcdRefused and bad.code == 3
    for code, msg in ((14, "etcdserver: request timed out"), (14, "etcdserver: no leader"),
                      (4, "context deadline exceeded")):
        assert isinstance(error_of("x", {"error": msg, "code": code, "message": msg}),
                          EtcdUnavailable)
    stream = error_of("x", {"error": {"grpc_code": 14, "http_code": 503,
                                      "message": "etcdserver: no leader"}})
    assert isinstance(stream, EtcdUnavailable) and "no leader" in str(stream)
    assert error_of("x", {"header": HEADER}) is None


def test_what_we_send() -> None:
    body = txn_body([Compare("k", "create_revision", "==", 0), Compare(b"k", "value", "!=", b"v"),
                     Compare("k", "lease", ">", 77)],
                    [OpPut("k", b"\x00", lease=99), OpGet("p/", prefix=True)],
                    [OpDelete("p/", prefix=True)])
    assert body == {
        "compare": [{"key": "aw==", "target": "CREATE", "result": "EQUAL",
                     "create_revision": "0"},
                    {"key": "aw==", "target": "VALUE", "result": "NOT_EQUAL", "value": "dg=="},
                    {"key": "aw==", "target": "LEASE", "result": "GREATER", "lease": "77"}],
        "success": [{"request_put": {"key": "aw==", "value": "AA==", "lease": "99"}},
                    {"request_range": {"key": "cC8=", "range_end": "cDA="}}],
        "failure": [{"request_delete_range": {"key": "cC8=", "range_end": "cDA="}}]}
