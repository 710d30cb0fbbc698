"""A scriptable EST server for client tests: real HTTPS (stdlib `http.server`) on a free loopback port.

Each operation (`simpleenroll`, `cacerts`, ...) answers from a script of replies, then from its
default (issue a certificate for the CSR, or the CA chain). Every request is recorded with its
arrival time, so tests check the client's timing by lower bounds on the gaps, never upper bounds.
PKCS#7 bodies are made by `openssl crl2pkcs7` (the outside tool, which keeps file order: an
unsorted SET) or re-encoded in BER with indefinite lengths by `to_ber`.
"""

from __future__ import annotations

import base64
import email.utils
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from provisioning import authority
from provisioning.certs import load_csr, to_pem
from tests.pki import TRUST_DOMAIN, Pki

P7_TYPE = "application/pkcs7-mime; smime-type=certs-only"


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Seen:
    at: float            # time.monotonic() on arrival, before the answer is sent
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def openssl_p7(certs: list[x509.Certificate]) -> bytes:
    """DER PKCS#7 from `openssl crl2pkcs7 -nocrl -certfile`: certificates in the order given (not DER-sorted)."""
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp) / "certs.pem"
        pem.write_bytes(to_pem(certs))
        out = subprocess.run(["openssl", "crl2pkcs7", "-nocrl", "-certfile", str(pem), "-outform", "DER"],
                             capture_output=True, check=True)
    return out.stdout


def sorted_p7(certs: list[x509.Certificate]) -> bytes:
    """DER PKCS#7 as `cryptography` writes it: the SET sorted, so the root may come first."""
    return pkcs7.serialize_certificates(certs, serialization.Encoding.DER)


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, contents start, contents end) of the definite-length DER element at `pos`."""
    first = data[pos + 1]
    start = pos + 2
    if first & 0x80:
        count = first & 0x7F
        length = int.from_bytes(data[start:start + count], "big")
        start += count
    else:
        length = first
    return data[pos], start, start + length


def _children(data: bytes, start: int, end: int) -> list[bytes]:
    out = []
    while start < end:
        stop = _tlv(data, start)[2]
        out.append(data[start:stop])
        start = stop
    return out


def to_ber(der: bytes) -> bytes:
    """The same PKCS#7 in BER: ContentInfo, its [0], SignedData and the certificates field get
    indefinite lengths (as streaming encoders write them); the certificates themselves stay DER."""
    def indefinite(tag: int, parts: list[bytes]) -> bytes:
        return bytes([tag, 0x80]) + b"".join(parts) + b"\x00\x00"

    _, body, end = _tlv(der, 0)
    oid, explicit = _children(der, body, end)
    _, inner, inner_end = _tlv(explicit, 0)
    (signed,) = _children(explicit, inner, inner_end)
    _, sbody, send = _tlv(signed, 0)
    fields = []
    for part in _children(signed, sbody, send):
        tag, pbody, pend = _tlv(part, 0)
        fields.append(indefinite(tag, _children(part, pbody, pend)) if tag == 0xA0 else part)
    return indefinite(0x30, [oid, indefinite(0xA0, [indefinite(0x30, fields)])])


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


Action = Reply | Callable[["EstServer", Seen], Reply]


class EstServer:
    """HTTPS EST server on 127.0.0.1:<free port>. `script[op]` replies are used first, in order.

    `label`: answer only under `/.well-known/est/<label>/` (RFC 7030 3.2.2), 404 elsewhere.
    `encode`: how PKCS#7 bodies are made (openssl_p7, sorted_p7, or lambda c: to_ber(openssl_p7(c))).
    `leaf_only`: enrollment answers hold the issued certificate alone (RFC 7030 4.2.3).
    """

    def __init__(self, pki: Pki, *, label: str = "", encode: Callable[[list[x509.Certificate]], bytes] = openssl_p7,
                 leaf_only: bool = True, cacerts: list[x509.Certificate] | None = None) -> None:
        self.pki = pki
        self.label = label
        self.encode = encode
        self.leaf_only = leaf_only
        self.ca_chain = cacerts if cacerts is not None else [pki.issuing.cert, pki.root.cert]
        self.script: dict[str, list[Action]] = {}
        self.seen: list[Seen] = []
        self.issued: list[x509.Certificate] = []
        self._lock = threading.Lock()
        certfile, keyfile = pki.server_files("est")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        context.load_verify_locations(cafile=str(pki.ca_chain_file))
        context.verify_mode = ssl.CERT_OPTIONAL  # re-enrollment presents the device certificate
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="est-server", daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> EstServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)

    def requests(self, operation: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path.rstrip("/").endswith("/" + operation)]

    # -- answers -------------------------------------------------------------------------------------
    def p7(self, certs: list[x509.Certificate]) -> Reply:
        return Reply(200, {"Content-Type": P7_TYPE, "Content-Transfer-Encoding": "base64"},
                     base64.encodebytes(self.encode(certs)))

    def issue(self, seen: Seen) -> Reply:
        csr = load_csr(seen.body)
        name = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        leaf = authority.device_cert(self.pki.issuing, csr.public_key(), str(name), TRUST_DOMAIN)
        self.issued.append(leaf)
        return self.p7([leaf] if self.leaf_only else [leaf, self.pki.issuing.cert, self.pki.root.cert])

    def _answer(self, seen: Seen) -> Reply:
        prefix = "/.well-known/est/" + (f"{self.label}/" if self.label else "")
        operation = seen.path[len(prefix):] if seen.path.startswith(prefix) else ""
        if "/" in operation or operation not in ("cacerts", "simpleenroll", "simplereenroll"):
            return Reply(404, {"Content-Type": "text/plain"}, f"no EST operation at {seen.path}\n".encode())
        with self._lock:
            queued = self.script.get(operation)
            action: Action | None = queued.pop(0) if queued else None
        if action is None:
            return self.p7(self.ca_chain) if operation == "cacerts" else self.issue(seen)
        return action if isinstance(action, Reply) else action(self, seen)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                arrived = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(arrived, self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
                with server._lock:
                    server.seen.append(seen)
                reply = server._answer(seen)
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
