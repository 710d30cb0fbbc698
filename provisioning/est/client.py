"""EST client (RFC 7030) on `requests`: `cacerts`, `simpleenroll`, `simplereenroll`.

Works against `tether-station serve` and against Cumulocity's certificate authority, which speaks
the same protocol: first enrollment with HTTP Basic (device id, one-time password), re-enrollment
with mutual TLS (our station) or the device's JWT as bearer (Cumulocity). Both 200 and 201 are
success (Cumulocity's documentation shows 201).

Errors are `EnrollmentError` with `retryable` set the way a caller schedules a retry: network
errors, timeouts, 5xx, 429 and 202 (pending) are worth retrying; other 4xx are not until something
changes (a new OTP, a fixed CSR). The server's reason text is in the message, and the delay it asked
for (`Retry-After`, RFC 7030 4.2.3, RFC 7231 7.1.3) in `retry_after`; this client never waits by
itself, the caller schedules the next attempt.

A CA under an RFC 7030 3.2.2 label is reached at `/.well-known/est/<label>/...`: pass `label`, or
give the URL with that path. PKCS#7 answers are read by `provisioning.est.pkcs7` (DER or BER, any
SET order, no warning), and an answer holding only the issued certificate is completed from
`/cacerts`, as RFC 7030 4.2.3 intends.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from provisioning import EnrollmentError, PemError
from provisioning.certs import issued_by, load_certificates, same_public_key, subject_of
from provisioning.est.pkcs7 import certificate_blobs
from provisioning.weburl import UrlError, parse_https_url

WELL_KNOWN = "/.well-known/est"
LABEL = re.compile(r"[A-Za-z0-9._~-]+")  # one path segment of RFC 3986 unreserved characters
_PKCS7_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-certificates")
CSR_TYPE = "application/pkcs10"
MAX_RESPONSE = 1 << 20
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
_REASON_LIMIT = 2000


@dataclass(frozen=True)
class BasicAuth:
    """HTTP Basic: the device id and a one-time password (first enrollment)."""

    username: str
    password: str = field(repr=False)  # never in a log line or a traceback's repr


@dataclass(frozen=True)
class ClientCertAuth:
    """Mutual TLS with a certificate chain file and its key file.

    `key_file` may be a TSS2 PEM of a TPM key: OpenSSL loads it through the tpm2 provider when
    OPENSSL_CONF was in the environment before `ssl` was imported (DESIGN.md "Keys"). `basic` adds
    HTTP Basic on top, for servers that want a password after TLS client authentication too (RFC 7030
    3.2.3; libest's estserver as shipped).
    """

    cert_file: str
    key_file: str
    password: bytes | None = field(default=None, repr=False)
    basic: BasicAuth | None = None


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


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value: delta-seconds or an HTTP-date (RFC 7231 7.1.3).

    None when absent or unreadable (the caller then uses its own backoff); a date in the past is 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit() and value.isascii():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses without a zone; HTTP dates are always GMT (RFC 7231 7.1.1.1)
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def est_base(url: str, label: str = "") -> str:
    """`https://host:port[/prefix]/.well-known/est[/label]` from the configured URL and label.

    The URL may already end in `/.well-known/est` or `/.well-known/est/<label>`; otherwise the
    well-known path is added after it. Raises EnrollmentError (not retryable) for a URL that is not
    https, a label that is not one RFC 3986 unreserved path segment, or two different labels.
    """
    try:  # the one URL rule (provisioning/weburl.py): requests connects to the host and port approved here
        approved = parse_https_url(url)
    except UrlError as exc:
        raise EnrollmentError(f"EST URL {exc}", retryable=False) from None
    if label and not LABEL.fullmatch(label):
        raise EnrollmentError(f"EST label {label!r} must be one path segment of letters, digits and '._~-' "
                              "(RFC 7030 3.2.2)", retryable=False)
    parts = urlsplit(str(approved))
    if parts.query or parts.fragment:
        raise EnrollmentError(f"EST URL {url!r} must not carry a query or fragment", retryable=False)
    path = parts.path.rstrip("/")
    prefix, marker, rest = path.partition(WELL_KNOWN)
    if not marker or (rest and not rest.startswith("/")):  # "/.well-known/estate" is not the EST path
        prefix, rest = path, ""
    url_label = rest.strip("/")
    if url_label and not LABEL.fullmatch(url_label):
        raise EnrollmentError(f"EST URL {url!r}: {url_label!r} after {WELL_KNOWN} must be one label segment "
                              "(RFC 7030 3.2.2)", retryable=False)
    if url_label and label and url_label != label:
        raise EnrollmentError(f"EST URL {url!r} names label {url_label!r} but the label {label!r} is configured "
                              "too: keep one", retryable=False)
    chosen = url_label or label
    base = f"https://{approved.netloc}{prefix}{WELL_KNOWN}"
    return f"{base}/{chosen}" if chosen else base


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
    absent, see `est_base`); `label` picks a CA under an RFC 7030 3.2.2 label; `ca_file` is the CA
    that signed the server's certificate ('' = system trust store)."""

    def __init__(self, base_url: str, ca_file: str = "", timeout: float = 10.0, auth: Auth = None,
                 label: str = "") -> None:
        self.base_url = est_base(base_url, label)
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

    def post(self, operation: str, body: bytes, content_type: str) -> bytes:
        """POST `body` to `<base>/<operation>` (an extension such as attest/start); the 200/201 answer's
        body, EnrollmentError for any other status."""
        return self._request("POST", operation, body, {"Content-Type": content_type})[1]

    def _enroll(self, operation: str, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        body = base64.b64encode(csr.public_bytes(Encoding.DER))  # one line (RFC 8951 3.1); servers differ
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
        retryable = status >= 500 or status in (202, 408, 429)
        after = parse_retry_after(answer.headers.get("Retry-After")) if retryable else None
        asked = f" (Retry-After: {answer.headers['Retry-After']})" if "Retry-After" in answer.headers else ""
        if status == 202:
            raise EnrollmentError(f"{url}: request accepted but pending (manual approval){asked}", retryable=True,
                                  status=status, retry_after=after)
        raise EnrollmentError(f"{url}: HTTP {status}: {reason}{asked if retryable else ''}", retryable=retryable,
                              status=status, retry_after=after)

    def _exchange(self, method: str, url: str, body: bytes | None, headers: dict[str, str] | None) -> _Answer:
        """One request, following redirects within the EST server's origin only (RFC 7030 3.2.1: a device
        has no user to ask about another origin), each hop read by the one URL rule. EnrollmentError (not
        retryable) for a redirect elsewhere, a hop the rule refuses, or more than MAX_REDIRECTS."""
        origin = parse_https_url(url)
        for _ in range(MAX_REDIRECTS + 1):
            answer = self._send(method, url, body, headers)
            location = answer.headers.get("Location") if answer.status in REDIRECTS else None
            if not location:
                return answer
            try:
                hop = parse_https_url(urljoin(url, location))
            except UrlError as exc:
                raise EnrollmentError(f"{url}: HTTP {answer.status} redirect refused: {exc}", retryable=False) from None
            if (hop.host, hop.port) != (origin.host, origin.port):
                raise EnrollmentError(f"{url}: HTTP {answer.status} redirect to another origin ({hop.netloc}) refused: "
                                      "the device's credentials stay with the EST server it was given (RFC 7030 "
                                      "3.2.1)", retryable=False)
            url = str(hop)
        raise EnrollmentError(f"{url}: more than {MAX_REDIRECTS} redirects", retryable=False)

    def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str] | None) -> _Answer:
        # Plain data out, so no error raised later holds the `requests` response (and through it the
        # socket) alive in its traceback.
        headers = dict(headers or {})
        auth: Any = None
        basic = self.auth.basic if isinstance(self.auth, ClientCertAuth) else self.auth
        if isinstance(basic, BasicAuth):
            auth = (basic.username, basic.password)
        elif isinstance(self.auth, BearerAuth):
            headers["Authorization"] = f"Bearer {self.auth.token}"
        try:
            with self.session.request(method, url, data=body, headers=headers, auth=auth, timeout=self.timeout,
                                      verify=self.ca_file or True, allow_redirects=False) as response:
                return _Answer(response.status_code, response.reason, CaseInsensitiveDict(response.headers),
                               response.content)
        except requests.exceptions.SSLError as exc:
            # a server we do not trust: retrying will not help until [est] ca_file changes; any other TLS
            # failure (a station restarting mid-handshake, a reset) is worth another try
            untrusted = _caused_by(exc, ssl.SSLCertVerificationError)
            raise EnrollmentError(f"{url}: TLS failed: {exc}", retryable=not untrusted) from None
        except UnicodeDecodeError:  # requests reads a redirect's Location as UTF-8 even when not following it
            raise EnrollmentError(f"{url}: the server's redirect Location is not UTF-8", retryable=False) from None
        except (requests.RequestException, OSError) as exc:
            raise EnrollmentError(f"{url}: {type(exc).__name__}: {exc}", retryable=True) from None

    def _certs(self, response: _Answer, data: bytes, operation: str) -> list[x509.Certificate]:
        where = f"{self.base_url}/{operation}"
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in _PKCS7_TYPES:
            raise EnrollmentError(f"{where}: expected application/pkcs7-mime, got "
                                  f"{content_type or 'no Content-Type'!r}", retryable=False,
                                  status=response.status)
        try:
            der = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            der = data  # some servers send binary DER despite RFC 7030 4.1.3
        try:
            if not der:
                raise PemError(f"{where} answer: empty")
            blobs = certificate_blobs(der, f"{where} answer") if not _is_certificate(der) else [der]
            certs = [_one_certificate(blob, f"{where} answer: certificate {i}") for i, blob in enumerate(blobs, 1)]
        except PemError as exc:
            raise EnrollmentError(str(exc), retryable=False, status=response.status) from None
        if not certs:
            raise EnrollmentError(f"{where}: the answer holds no certificate", retryable=False,
                                  status=response.status)
        return certs


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `kind` is in the chain requests and urllib3 wrap around a socket error (causes,
    contexts, `MaxRetryError.reason`, first arguments)."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        if isinstance(item, kind):
            return True
        seen.add(id(item))
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args[:1]]
    return False


def _is_certificate(der: bytes) -> bool:
    """A bare DER certificate (some servers answer so) rather than a PKCS#7 ContentInfo."""
    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return True


def _one_certificate(blob: bytes, where: str) -> x509.Certificate:
    try:
        x509.load_der_x509_certificate(blob)
    except ValueError as exc:
        raise PemError(f"{where}: not a DER X.509 certificate ({exc})") from None
    return load_certificates(blob, where)[0]  # the same bytes again, for its name checks
