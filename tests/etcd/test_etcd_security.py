"""etcd's own security (docs/ha.md): a member that serves clients over TLS and requires
client certificates, and one with authentication enabled. The client reaches both
with EtcdSecurity; without it, or with the wrong credentials, it is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import LEAF_EXT, Pki, _addext, _openssl
from etcdrig import ETCD, SKIP_REASON, EtcdProc

from controller.etcd import (
    EtcdError,
    EtcdRefused,
    EtcdSecurity,
    EtcdUnavailable,
    etcd_security,
    open_etcd,
)

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)


def member_cert(pki: Pki, d: Path) -> tuple[Path, Path]:
    """A member certificate for both ends: with --client-cert-auth, etcd's JSON gateway
    dials the member's own gRPC port presenting the member's certificate, so it needs
    extendedKeyUsage serverAuth and clientAuth (docs/ha.md)."""
    ca_key = pki.ca.with_suffix(".key")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=etcd", "-addext",
             "subjectAltName=IP:127.0.0.1", *_addext(LEAF_EXT),
             "-addext", "extendedKeyUsage=serverAuth,clientAuth",
             "-keyout", "etcd.key", "-out", "etcd.csr", cwd=d)
    _openssl("x509", "-req", "-in", "etcd.csr", "-CA", str(pki.ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-copy_extensions", "copyall",
             "-out", "etcd.crt", cwd=d)
    return d / "etcd.crt", d / "etcd.key"


@pytest.fixture
def tls_etcd(tmp_path: Path, pki: Pki) -> Iterator[EtcdProc]:
    cert, key = member_cert(pki, tmp_path)
    m = EtcdProc(tmp_path / "etcd", tmp_path / "etcd.log", tls=(pki.ca, cert, key),
                 client_cert=(pki.client_cert, pki.client_key)).start()
    try:
        yield m
    finally:
        m.stop()


# a member that refuses our missing client certificate cuts the connection while httpx
# sends the request body: httpx leaves that body's async generator suspended, and trio
# warns when it is collected (harmless: nothing is left open)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_tls_with_client_certificates(tls_etcd: EtcdProc, pki: Pki) -> None:
    assert tls_etcd.url.startswith("https://")
    sec = etcd_security(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
    async with open_etcd(tls_etcd.url, security=sec) as etcd:
        await etcd.put("k", "v")
        assert (await etcd.get("k")).kvs[0].value == b"v"
        r = await etcd.put("w", "1")
        async with etcd.watch("w", start_revision=r.revision) as w:
            with trio.fail_after(5):
                ev = await w.__anext__()
            assert ev.kv.value == b"1"
    # the oracle fails: no client certificate, or a CA that did not sign the member's
    async with open_etcd(tls_etcd.url, security=etcd_security(ca=str(pki.ca)),
                         timeout=2) as etcd:
        with pytest.raises(EtcdError):
            await etcd.get("k")
    async with open_etcd(tls_etcd.url, timeout=2) as etcd:  # the system's CAs
        with pytest.raises(EtcdUnavailable, match="TLS: unable to get local issuer certificate"):
            await etcd.get("k")


async def _enable_auth(etcd_url: str) -> None:
    async with open_etcd(etcd_url) as etcd:
        for path, body in (("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
                           ("/v3/auth/role/add", {"name": "root"}),
                           ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
                           ("/v3/auth/enable", {})):
            await etcd.call(path, body, retry=False)


async def test_authentication_and_a_token_that_expires(etcd: EtcdProc, tmp_path: Path) -> None:
    await _enable_auth(etcd.url)
    pw = tmp_path / "pw"
    pw.write_text("rootpw\n")
    sec = etcd_security(user="root", password_file=str(pw))
    assert sec == EtcdSecurity(user="root", password="rootpw")
    async with open_etcd(etcd.url, security=sec) as c:
        await c.put("k", "v")
        c._auth_token = "not-a-token.1"  # as after it expired: authenticated again
        assert (await c.get("k")).kvs[0].value == b"v"
        assert c._auth_token != "not-a-token.1"
        c._auth_token = "not-a-token.2"
        r = await c.put("w", "1")
        async with c.watch("w", start_revision=r.revision) as w:
            with trio.fail_after(5):
                ev = await w.__anext__()
            assert ev.kv.value == b"1"
    # the oracle fails: no credentials, a wrong password
    async with open_etcd(etcd.url) as c:
        with pytest.raises(EtcdRefused, match="user name is empty|permission denied"):
            await c.get("k")
    pw.write_text("wrong\n")
    async with open_etcd(etcd.url, security=etcd_security(
            user="root", password_file=str(pw))) as c:
        with pytest.raises(EtcdRefused, match="authentication failed"):
            await c.get("k")


def test_options_that_do_not_go_together(tmp_path: Path) -> None:
    assert etcd_security() is None
    with pytest.raises(ValueError, match="--etcd-key needs --etcd-cert"):
        etcd_security(key="k.pem")
    with pytest.raises(ValueError, match="go together"):
        etcd_security(user="root")
    with pytest.raises(ValueError, match="No such file"):
        etcd_security(user="root", password_file=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="etcd TLS"):
        EtcdSecurity(ca=str(tmp_path / "none.pem")).ssl_context()
