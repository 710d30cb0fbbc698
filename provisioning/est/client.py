"""EST client (RFC 7030) on `requests`: `cacerts`, `simpleenroll`, `simplereenroll`.

Works against `tether-station serve` and against Cumulocity's certificate authority, which speaks
the same protocol: first enrollment with HTTP Basic (device id, one-time password), re-enrollment
with mutual TLS (our station) or the device's JWT as bearer (Cumulocity). Both 200 and 201 are
success (Cumulocity's documentation shows 201).

Errors are `EnrollmentError` with `retryable` set the way a caller schedules a retry: network
errors, timeouts, 5xx, 429 and 202 (pending) are worth retrying; other 4xx are not until something
changes (a new OTP, a fixed CSR). The server's reason text is in the message.
"""

from __future__ import annotations

import base64
import binascii
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from provisioning.certs import issued_by, load_certificates, same_public_key, subject_of
from provisioning.errors import EnrollmentError, PemError

WELL_KNOWN = "/.well-known/est"
CSR_TYPE = "application/pkcs10"
MAX_RESPONSE = 1 << 20
_REASON_LIMIT = 2000


@dataclass(frozen=True)
class BasicAuth:
    """HTTP Basic: the device id and a one-time password (first enrollment)."""

    username: str
    password: str


@dataclass(frozen=True)
class ClientCertAuth:
    """Mutual TLS with a certificate chain file and its key file.

    `key_file` may be a TSS2 PEM of a TPM key: OpenSSL loads it through the tpm2 provider when
    OPENSSL_CONF was in the environment before `ssl` was imported (DESIGN.md "Keys").
    """

    cert_file: str
    key_file: str
    password: bytes | None = None


@dataclass(frozen=True)
class BearerAuth:
    """`Authorization: Bearer <jwt>`: Cumulocity's CA re-enrollment with the device token."""

    token: str


Auth = BasicAuth | ClientCertAuth | BearerAuth | None


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str
    headers: Mapping[str, str]   # case-insensitive, as HTTP header names are
    content: bytes


class _ContextAdapter(HTTPAdapter):
    """Hands urllib3 our SSLContext, so a client key with a password (or a TPM key) is loaded once by us."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


def order_chain(certs: list[x509.Certificate], leaf_key: Any | None = None) -> list[x509.Certificate]:
    """Leaf first, then each certificate's issuer, up to the root.

    PKCS#7 holds its certificates as a SET, which DER encoding sorts, so the wire order means nothing.
    The leaf is the certificate for `leaf_key` when given, else the one that issued no other.
    """
    if not certs:
        return []
    pool = list(certs)
    leaf = next((c for c in pool if leaf_key is not None and same_public_key(c.public_key(), leaf_key)), None)
    if leaf is None:
        issuers = {c.issuer for c in pool if c.issuer != c.subject}
        leaf = next((c for c in pool if c.subject not in issuers), pool[0])
    chain = [leaf]
    pool.remove(leaf)
    while pool and chain[-1].issuer != chain[-1].subject:
        parent = next((c for c in pool if c.subject == chain[-1].issuer and _signed(chain[-1], c)), None)
        if parent is None:
            break
        chain.append(parent)
        pool.remove(parent)
    return chain


def _signed(child: x509.Certificate, parent: x509.Certificate) -> bool:
    return issued_by(child, parent)


class EstClient:
    """One EST server. `base_url` is `https://host:port` (the `/.well-known/est` path is added when
    absent); `ca_file` is the CA that signed the server's certificate ('' = system trust store)."""

    def __init__(self, base_url: str, ca_file: str = "", timeout: float = 10.0, auth: Auth = None) -> None:
        if not base_url.startswith("https://"):
            raise EnrollmentError(f"EST URL {base_url!r} must start with https:// (RFC 7030 requires TLS)",
                                  retryable=False)
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith(WELL_KNOWN) else base + WELL_KNOWN
        self.ca_file = ca_file
        self.timeout = timeout
        self.auth = auth
        self.session = requests.Session()
        if isinstance(auth, ClientCertAuth):
            context = ssl.create_default_context(cafile=ca_file or None)
            try:
                context.load_cert_chain(auth.cert_file, auth.key_file, auth.password)
            except (ssl.SSLError, OSError) as exc:
                raise EnrollmentError(f"cannot load the client certificate {auth.cert_file} with key "
                                      f"{auth.key_file}: {exc} (a TPM key needs OPENSSL_CONF set before start)",
                                      retryable=False) from None
            self.session.mount("https://", _ContextAdapter(context))

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> EstClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations ----------------------------------------------------------------------------------
    def cacerts(self) -> list[x509.Certificate]:
        """The CA certificates (RFC 7030 4.1), ordered issuing CA .. root."""
        return order_chain(self._certs(*self._request("GET", "cacerts"), "cacerts"))

    def simpleenroll(self, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        """Enroll; returns the chain leaf .. root (completed from /cacerts if the answer holds only the leaf)."""
        return self._enroll("simpleenroll", csr)

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        """Re-enroll with the current credentials (mTLS or bearer); returns the chain leaf .. root."""
        return self._enroll("simplereenroll", csr)

    def _enroll(self, operation: str, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        body = base64.encodebytes(csr.public_bytes(Encoding.DER))
        response, content = self._request("POST", operation, body, {"Content-Type": CSR_TYPE,
                                                                     "Content-Transfer-Encoding": "base64"})
        certs = self._certs(response, content, operation)
        chain = order_chain(certs, csr.public_key())
        if not same_public_key(chain[0].public_key(), csr.public_key()):
            raise EnrollmentError(f"{self.base_url}/{operation}: the answer holds no certificate for the CSR's key "
                                  f"(got {', '.join(subject_of(c) for c in certs)})", retryable=False)
        if chain[-1].issuer != chain[-1].subject:  # only the leaf (or a partial chain): complete it
            cas = self.cacerts()
            chain = order_chain([*chain, *[c for c in cas if c not in chain]], csr.public_key())
        return chain

    # -- HTTP ------------------------------------------------------------------------------------------
    def _request(self, method: str, operation: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[_Answer, bytes]:
        """(answer, body) for a 200/201 answer; EnrollmentError for anything else."""
        url = f"{self.base_url}/{operation}"
        answer = self._exchange(method, url, body, headers)
        content, status = answer.content, answer.status
        if len(content) > MAX_RESPONSE:
            raise EnrollmentError(f"{url}: answer larger than {MAX_RESPONSE} bytes", retryable=False, status=status)
        if status in (200, 201):
            return answer, content
        reason = content.decode("utf-8", "replace").strip()[:_REASON_LIMIT] or answer.reason
        if status == 202:
            raise EnrollmentError(f"{url}: request accepted but pending (manual approval); retry after "
                                  f"{answer.headers.get('Retry-After', '?')} s", retryable=True, status=status)
        retryable = status >= 500 or status in (408, 429)
        raise EnrollmentError(f"{url}: HTTP {status}: {reason}", retryable=retryable, status=status)

    def _exchange(self, method: str, url: str, body: bytes | None, headers: dict[str, str] | None) -> _Answer:
        # Plain data out, so no error raised later holds the `requests` response (and through it the
        # socket) alive in its traceback.
        headers = dict(headers or {})
        auth: Any = None
        if isinstance(self.auth, BasicAuth):
            auth = (self.auth.username, self.auth.password)
        elif isinstance(self.auth, BearerAuth):
            headers["Authorization"] = f"Bearer {self.auth.token}"
        try:
            with self.session.request(method, url, data=body, headers=headers, auth=auth, timeout=self.timeout,
                                      verify=self.ca_file or True) as response:
                return _Answer(response.status_code, response.reason, CaseInsensitiveDict(response.headers),
                               response.content)
        except requests.exceptions.SSLError as exc:
            # a certificate the server refuses, or a server we do not trust: retrying will not help;
            # but a connection cut during the handshake (a server restarting) is a network error
            raise EnrollmentError(f"{url}: TLS failed: {exc}", retryable=_cut_short(exc)) from None
        except (requests.RequestException, OSError) as exc:
            raise EnrollmentError(f"{url}: {type(exc).__name__}: {exc}", retryable=True) from None

    def _certs(self, response: _Answer, data: bytes, operation: str) -> list[x509.Certificate]:
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in ("application/pkcs7-mime", "application/x-pkcs7-certificates"):
            raise EnrollmentError(f"{self.base_url}/{operation}: expected application/pkcs7-mime, got "
                                  f"{content_type or 'no Content-Type'!r}", retryable=False,
                                  status=response.status)
        try:
            der = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            der = data  # some servers send binary DER despite RFC 7030 4.1.3
        try:
            certs = load_certificates(der, f"{self.base_url}/{operation} answer")
        except PemError as exc:
            raise EnrollmentError(str(exc), retryable=False, status=response.status) from None
        if not certs:
            raise EnrollmentError(f"{self.base_url}/{operation}: the answer holds no certificate",
                                  retryable=False, status=response.status)
        return certs


def _cut_short(exc: BaseException) -> bool:
    """True when an SSL failure is the peer closing the connection mid-handshake (ssl.SSLEOFError
    somewhere in the chain requests and urllib3 wrap it in), not a refusal."""
    import ssl

    seen: list[object] = [exc]
    visited: set[int] = set()
    while seen:
        item = seen.pop()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, ssl.SSLEOFError | ConnectionResetError):
            return True
        if isinstance(item, BaseException):
            seen += [a for a in item.args if isinstance(a, BaseException)]
            seen += [x for x in (getattr(item, "reason", None), item.__cause__, item.__context__) if x is not None]
    return False
