"""TLS files and TLS failures in words a user can act on.

OpenSSL reports most mistakes with PEM files as "PEM lib" and a handshake that
fails verification with its own terse strings ("self-signed certificate in
certificate chain"). This module loads the files into an ``ssl.SSLContext`` and,
when that fails, looks at the files to say which one is wrong and how
(``load_cert_chain``, ``load_ca``); ``handshake_hint`` adds what to do about a
verification failure of the controller's certificate (``client.connect_stream``).

Pure apart from reading the named files; no trio.
"""

from __future__ import annotations

import ssl

CERT_BEGIN = "-----BEGIN CERTIFICATE-----"
TRUSTED_BEGIN = "-----BEGIN TRUSTED CERTIFICATE-----"
KEY_MARK = "PRIVATE KEY-----"  # -----BEGIN [RSA |EC |ENCRYPTED ]PRIVATE KEY-----


class TlsFileError(ValueError):
    """A certificate, key or CA file that cannot be used; a one-line message naming it."""


def _read(path: str) -> str:
    """The file's text (undecodable bytes replaced); TlsFileError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("ascii", "replace")
    except OSError as e:
        raise TlsFileError(f"cannot read {path}: {e.strerror or e}") from None


def _is_cert(text: str) -> bool:
    return CERT_BEGIN in text or TRUSTED_BEGIN in text


def cert_chain_problem(cert: str, key: str | None, err: Exception) -> str:
    """What is wrong with cert and key (PEM files; key None: the key is in cert), given
    the error ``SSLContext.load_cert_chain`` raised for them. One phrase, naming the file."""
    cert_text = _read(cert)
    if not _is_cert(cert_text):
        if KEY_MARK in cert_text:
            return (f"{cert} holds a private key, not a certificate (--tls-cert and "
                    "--tls-key swapped?)")
        return f"{cert} is not a PEM certificate (no '{CERT_BEGIN}' line)"
    key_path = key or cert
    key_text = cert_text if key is None else _read(key)
    if KEY_MARK not in key_text:
        if key is None:
            return f"{cert} holds no private key: give its key with --tls-key"
        if _is_cert(key_text):
            return (f"{key} holds a certificate, not a private key (--tls-cert and "
                    "--tls-key swapped?)")
        return f"{key} is not a PEM private key (no '-----BEGIN PRIVATE KEY-----' line)"
    if "ENCRYPTED" in key_text:
        return (f"{key_path} is encrypted with a passphrase, which virtfs cannot ask for: "
                f"decrypt it (openssl pkey -in {key_path} -out PLAIN.key; chmod 600 PLAIN.key)")
    if isinstance(err, ssl.SSLError) and err.reason == "KEY_VALUES_MISMATCH":
        return f"the key {key_path} does not belong to the certificate {cert}"
    if isinstance(err, OSError) and not isinstance(err, ssl.SSLError):
        return str(err.strerror or err)
    reason = getattr(err, "reason", None)
    return f"{cert} or {key_path} is damaged ({reason or err})"


def load_cert_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    """ctx.load_cert_chain(cert, key), never prompting for a passphrase.

    Raises TlsFileError: "cannot load the TLS certificate CERT [and key KEY]: WHAT",
    WHAT saying which file is wrong and how (not OpenSSL's "PEM lib").
    """
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except (OSError, ssl.SSLError) as e:
        try:
            what = cert_chain_problem(cert, key, e)
        except TlsFileError as te:
            what = str(te)
        raise TlsFileError(f"cannot load the TLS certificate {cert}"
                           f"{' and key ' + key if key else ''}: {what}") from None


def ca_problem(path: str, err: Exception) -> str:
    """What is wrong with the CA file at path, given the error loading it raised."""
    text = _read(path)
    if not _is_cert(text):
        if KEY_MARK in text:
            return f"{path} holds a private key, not a CA certificate"
        return f"{path} holds no PEM certificate (no '{CERT_BEGIN}' line)"
    if isinstance(err, OSError) and not isinstance(err, ssl.SSLError):
        return str(err.strerror or err)
    return f"{path} is damaged ({getattr(err, 'reason', None) or err})"


def load_ca(ctx: ssl.SSLContext, path: str, what: str = "the CA") -> None:
    """ctx.load_verify_locations(path); TlsFileError "cannot load WHAT PATH: WHY"."""
    try:
        ctx.load_verify_locations(path)
    except (OSError, ssl.SSLError) as e:
        try:
            why = ca_problem(path, e)
        except TlsFileError as te:
            why = str(te)
        raise TlsFileError(f"cannot load {what} {path}: {why}") from None


# verify_message strings of OpenSSL's X509_V_ERR_* for a chain that ends in no trusted CA
UNTRUSTED = ("self-signed certificate", "self signed certificate",
             "unable to get local issuer certificate", "unable to get issuer certificate")
# ... and for a chain that VERIFY_X509_STRICT refuses (OpenSSL 3.x)
STRICT = ("key usage", "basic constraints", "key identifier", "not marked critical",
          "explicit parameters", "empty subject", "empty issuer", "missing subject")


def handshake_hint(verify_message: str, ca: str | None) -> str:
    """What to do about a client-side verification failure of the controller's
    certificate ('' when there is nothing useful to add). ca: the --tls-ca given, if any."""
    m = verify_message.lower()
    if any(s in m for s in UNTRUSTED):
        if ca is None:
            return ("pass --tls-ca with the CA that signed the controller's certificate, "
                    "or set $VIRTFS_TLS_CA")
        return f"{ca} did not sign the controller's certificate; pass the CA that did"
    if any(s in m for s in STRICT):
        return ("certificates are verified strictly (X.509 strict, as Python 3.13 does): "
                "make the CA with basicConstraints=critical,CA:TRUE and "
                "keyUsage=critical,keyCertSign,cRLSign as docs/security.md shows; check with "
                "'openssl verify -x509_strict -CAfile CA CERT'")
    if "hostname mismatch" in m or "ip address mismatch" in m:
        return "the controller's certificate must name that host or IP in its subjectAltName"
    if "expired" in m or "not yet valid" in m:
        return "check the certificates' dates and the clocks of both hosts"
    return ""
