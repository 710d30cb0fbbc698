"""The EST resources (RFC 7030 section 3.2.2): a complete `HttpRequest` in, a `Response` out, no I/O.

`/cacerts` and `/csrattrs` are answered from memory; `/simpleenroll` and `/simplereenroll` go to
`enrollment.Enrollment.handle`; `/serverkeygen` is answered 501 (keys are made on the device).
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field

from provisioning.certs import pkcs7_certs_only
from provisioning.station import attestation
from provisioning.station.enrollment import ENROLL, REENROLL, Enrollment, Request, Steps, drive
from provisioning.station.errors import Refusal
from provisioning.station.refusals import device_of_request
from provisioning.station.wire import HttpRequest

log = logging.getLogger("tether.station")

PREFIX = "/.well-known/est/"
PKCS7_TYPE = "application/pkcs7-mime; smime-type=certs-only"
CSRATTRS_TYPE = "application/csrattrs"
TEXT_TYPE = "text/plain; charset=utf-8"
_PHRASES = {200: "OK", 100: "Continue", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
            413: "Content Too Large", 415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False   # close the connection after this answer

    def render(self, keep_alive: bool) -> bytes:
        """The status line, headers and body as they go on the wire."""
        lines = [f"HTTP/1.1 {self.status} {_PHRASES.get(self.status, 'Status')}", "Server: tether-station",
                 f"Content-Type: {self.content_type}"]
        if self.content_type.startswith(("application/pkcs7", CSRATTRS_TYPE)):
            lines.append("Content-Transfer-Encoding: base64")
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        lines.append(f"Content-Length: {len(self.body)}")
        if not keep_alive or self.close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def text(status: int, reason: str, headers: dict[str, str] | None = None, close: bool = False) -> Response:
    return Response(status, (reason.rstrip() + "\n").encode(), TEXT_TYPE, headers or {}, close)


def internal_error(close: bool = False) -> Response:
    """The 500 a bug or a ledger outage costs one request (the operator's log has the traceback)."""
    return text(500, "internal error in the station; the operator's log has the details", close=close)


def respond(enrollment: Enrollment, request: HttpRequest, peer_der: bytes | None, client: str) -> Response:
    """The answer to one EST request from `client` (its address, for the log), its ledger writes made
    in this thread."""
    return drive(respond_steps(enrollment, request, peer_der, client), enrollment.ledger.db.write)


def respond_steps(enrollment: Enrollment, request: HttpRequest, peer_der: bytes | None,
                  client: str) -> Steps[Response]:
    """`respond` as steps (`enrollment.Enrollment.steps`): yields the ledger writes of an enrollment,
    for the worker's loop to hand to its commit thread; returns the Response."""
    method, path = request.head.method, request.path
    operation = path.removeprefix(PREFIX) if path.startswith(PREFIX) else None
    if method not in ("GET", "POST"):
        return text(501, f"method {method} is not implemented; EST uses GET and POST", close=True)
    if operation == attestation.CACERTS and method == "GET":  # the "attest" label's CA is this one
        operation = "cacerts"
    if operation == "cacerts" and method == "GET":
        return Response(200, enrollment.cacerts_body, PKCS7_TYPE)
    if operation == "csrattrs" and method == "GET":
        return Response(200, enrollment.csrattrs_body, CSRATTRS_TYPE)
    if operation == "serverkeygen":
        return text(501, "server-side key generation (serverkeygen) is not offered by this station: make the key "
                         f"on the device and send its CSR to {PREFIX}{ENROLL}")
    if operation in (ENROLL, REENROLL) and method == "POST":
        return (yield from _enroll(enrollment, request, operation, peer_der, client))
    if operation in (attestation.START, attestation.ENROLL) and method == "POST":
        return _attest(enrollment, request, operation, client)
    posts = (ENROLL, REENROLL, attestation.START, attestation.ENROLL)
    if operation in ("cacerts", "csrattrs", *posts):
        return text(405, f"{path} does not take {method}", {"Allow": "POST" if operation in posts else "GET"})
    return text(404, f"no such EST resource {path!r}; the station serves {PREFIX}cacerts, {PREFIX}csrattrs, "
                     f"{PREFIX}{ENROLL}, {PREFIX}{REENROLL}, {PREFIX}{attestation.START} and "
                     f"{PREFIX}{attestation.ENROLL}")


def _enroll(enrollment: Enrollment, request: HttpRequest, operation: str, peer_der: bytes | None,
            client: str) -> Steps[Response]:
    head = request.head
    if head.get("content-length") is None and head.get("transfer-encoding") is None:
        return text(411, "the CSR must come as the request body, with Content-Length or Transfer-Encoding: chunked")
    try:
        req = Request(operation=operation, content_type=(head.get("content-type") or "").split(";")[0].strip().lower(),
                      body=request.body, basic=basic_credentials(head.get("authorization")), peer_der=peer_der,
                      client=client)
        answer = yield from enrollment.steps(req)
    except Refusal as refusal:
        # the console's live page, bounded per address (provisioning/station/refusals.py); never raises
        enrollment.refusals.record(operation, device_of_request(req), refusal.status, refusal.reason, client)
        log.info("%s %s refused %d: %s", client, operation, refusal.status,
                 "; ".join(line.strip() for line in refusal.reason.splitlines()))
        return text(refusal.status, refusal.reason, refusal.headers)
    except Exception:  # a bug or a ledger outage must cost one request, never the server
        log.exception("%s %s failed", client, operation)
        return internal_error()
    log.info("%s %s issued serial %s to %s%s", client, operation, answer.row.serial, answer.row.device_id,
             " (retry, same certificate)" if answer.reused else "")
    return Response(200, answer.body, PKCS7_TYPE)


def _attest(enrollment: Enrollment, request: HttpRequest, operation: str, client: str) -> Response:
    """Attested enrollment (docs/station.md "Attested enrollment"): refusals are recorded like EST's."""
    head = request.head
    content_type = (head.get("content-type") or "").split(";")[0].strip().lower()
    basic = basic_credentials(head.get("authorization"))
    try:
        if operation == attestation.START:
            return Response(200, enrollment.attestation.start(content_type, request.body), attestation.JSON_TYPE)
        row, reused = enrollment.attestation.enroll(content_type, request.body, basic)
    except Refusal as refusal:
        device = attestation.claimed_device(request.body) if operation == attestation.START else \
            (basic[0] if basic and basic[0] else "?")
        enrollment.refusals.record(operation, device, refusal.status, refusal.reason, client)
        log.info("%s %s refused %d: %s", client, operation, refusal.status,
                 "; ".join(line.strip() for line in refusal.reason.splitlines()))
        return text(refusal.status, refusal.reason, refusal.headers)
    except Exception:  # a bug or a ledger outage must cost one request, never the server
        log.exception("%s %s failed", client, operation)
        return internal_error()
    log.info("%s %s issued serial %s to %s (TPM-attested)%s", client, operation, row.serial, row.device_id,
             " (retry, same certificate)" if reused else "")
    return Response(200, pkcs7_certs_only([row.certificate]), PKCS7_TYPE)


def basic_credentials(value: str | None) -> tuple[str, str] | None:
    """(user, password) of an HTTP Basic Authorization header; ("", "") when malformed; None when absent."""
    scheme, _, token = (value or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")  # malformed credentials are refused as bad credentials
    return (user, password) if sep else ("", "")
