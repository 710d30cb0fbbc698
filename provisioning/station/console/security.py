"""Who is asking and may they: the operator behind a client certificate, roles, CSRF tokens, headers.

Authentication is the TLS handshake (client certificate from the operator CA, required); this module
then maps the certificate's serial to an unrevoked operator in the ledger. CSRF tokens are an HMAC of
the operator's certificate serial and the form's target path under a key made when the console
starts: a page of another origin can make the browser send the certificate, but it cannot read or
forge a token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from provisioning.station.console.store import ConsoleStore, Operator
from provisioning.station.ledger import serial_hex

# No inline script or style anywhere: scripts and styles come from /static only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class Denied(Exception):
    """A request the console refuses: HTTP `status` and the reason shown to the operator."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Caller:
    operator: Operator
    address: str

    @property
    def who(self) -> str:
        return f"{self.operator.name} ({self.operator.role}, serial {self.operator.serial[:16]})"

    @property
    def is_admin(self) -> bool:
        return self.operator.role == "admin"


def identify(store: ConsoleStore, serial: int | None, address: str, now: int) -> Caller:
    """The operator presenting certificate `serial` (already verified against the operator CA)."""
    if serial is None:
        raise Denied(401, "no client certificate: import your operator certificate (tether-station operator add)")
    operator = store.operator(serial_hex(serial))
    if operator is None:
        raise Denied(403, f"certificate serial {serial_hex(serial)} is not a console operator of this station")
    if operator.revoked_at is not None:
        raise Denied(403, f"operator {operator.name}'s certificate was revoked; ask an administrator for a new one")
    if operator.not_after < now:
        raise Denied(403, f"operator {operator.name}'s certificate has expired")
    return Caller(operator, address)


def holder(store: ConsoleStore, serial: int | None, address: str) -> str:
    """Who to name in the audit trail for a refused certificate: the operator it was issued to (revoked
    or expired ones too, so their attempts can be found under their name), else the bare serial."""
    if serial is None:
        return "no certificate"
    operator = store.operator(serial_hex(serial))
    return Caller(operator, address).who if operator else f"unknown certificate (serial {serial_hex(serial)})"


def reauthorize(store: ConsoleStore, caller: Caller, now: int) -> Caller:
    """`caller` asked again of the ledger (Denied if the operator was revoked or has expired since):
    for a response that outlives its request, such as the live page's event stream."""
    return identify(store, int(caller.operator.serial, 16), caller.address, now)


def require_admin(caller: Caller, action: str) -> None:
    if not caller.is_admin:
        raise Denied(403, f"{action} needs the admin role; operator {caller.operator.name} is {caller.operator.role}")


class Csrf:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def token(self, caller: Caller, path: str) -> str:
        return hmac.new(self._key, f"{caller.operator.serial}\0{path}".encode(), hashlib.sha256).hexdigest()

    def check(self, caller: Caller, path: str, token: str | None) -> None:
        if not token or not hmac.compare_digest(self.token(caller, path), token):
            raise Denied(403, "missing or stale form token (CSRF protection): reload the page and submit again")
