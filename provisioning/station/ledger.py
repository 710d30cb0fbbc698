"""The issuance domain: one row per issued certificate, the hashed one-time passwords, barred devices.

Every issuance is one transaction that inserts the certificate row and consumes the OTP together, so a
station killed mid-request leaves either both or neither. The database under it (SQLite or
PostgreSQL, pooled connections, group commit, the schema and its migrations) is `database.Database`;
the tables are declared in `schema.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from provisioning.authority import Issued
from provisioning.certs import common_name
from provisioning.station import schema
from provisioning.station.database import Database, Query
from provisioning.station.errors import Refusal, StationError
from provisioning.station.schema import PARTS, SUPERSEDED

KINDS = ("device", "server", "service")  # service: a reserved identity issued by `issue --service`
DEFAULT_MAX_VALID = 2
DEFAULT_SUPERSEDE_GRACE = 7 * 24 * 3600

# Interpolated into SQL below: constants only, never input (hence the S608 waivers).
_ROW_COLUMNS = ("serial, device_id, subject, kind, not_before, not_after, csr_fingerprint, issued_at, "
                "revoked_at, cert_der, predecessor, revoke_reason, supersede_at")

# CRL reason names (RFC 5280 5.3.1, as `x509.ReasonFlags` values) an operator may give
REASONS = ("unspecified", "keyCompromise", "affiliationChanged", "superseded", "cessationOfOperation")


@dataclass(frozen=True)
class Row:
    """One issued certificate. `serial` is lowercase hex without `0x`; times are Unix seconds."""

    serial: str
    device_id: str
    subject: str
    kind: str
    not_before: int
    not_after: int
    csr_fingerprint: str
    issued_at: int
    revoked_at: int | None
    cert_der: bytes
    predecessor: str | None = None      # serial of the certificate this one re-enrolled from
    revoke_reason: str | None = None    # one of REASONS once revoked
    supersede_at: int | None = None     # revoked as superseded at this time unless revoked earlier

    def revocation(self, now: int) -> tuple[int, str] | None:
        """(when, reason) if this certificate counts as revoked at `now`, else None."""
        if self.revoked_at is not None:
            return self.revoked_at, self.revoke_reason or "unspecified"
        if self.supersede_at is not None and self.supersede_at <= now:
            return self.supersede_at, SUPERSEDED
        return None

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.cert_der)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["cert_der"]
        return out


def serial_hex(serial: int | str) -> str:
    """Normalise a serial (int, `0x1f`, `1F`, `1f`) to the ledger's key; StationError if not hex."""
    if isinstance(serial, int):
        return f"{serial:x}"
    text = serial.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return f"{int(text, 16):x}"
    except ValueError:
        raise StationError(f"serial {serial!r} is not a hexadecimal certificate serial number") from None


@dataclass(frozen=True)
class Otp:
    """A stored one-time password (only its digest); `serial` is what it was used for."""

    digest: str
    device_id: str
    created_at: int
    expires_at: int
    used_at: int | None
    csr_fingerprint: str | None
    serial: str | None
    locked_at: int | None = None    # set by older stations (per-id lockout, issue 22 item 5): ignored
    voided_at: int | None = None    # the device was revoked before this password was used


@dataclass(frozen=True)
class Bar:
    """An operator revoked `device_id` at `barred_at`: no bootstrap certificate and no one-time password
    issued before then enrolls it again (see `Ledger.readmit`)."""

    device_id: str
    barred_at: int
    reason: str


class Ledger:
    """The ledger at `location`: a `postgresql://` URL, `sqlite:///path`, or a plain file path."""

    def __init__(self, location: str | Path, sync: str = "full", *, max_valid: int = DEFAULT_MAX_VALID,
                 supersede_grace: int = DEFAULT_SUPERSEDE_GRACE) -> None:
        """`max_valid`: valid certificates one device may hold (older ones are superseded beyond it);
        `supersede_grace`: seconds a re-enrolled certificate stays valid if its successor is never used."""
        if max_valid < 1:
            raise StationError(f"max_valid_certs {max_valid}: a device must be able to hold at least 1 certificate")
        if supersede_grace < 0:
            raise StationError(f"supersede_grace {supersede_grace}: must be 0 or more seconds")
        self.max_valid = max_valid
        self.supersede_grace = supersede_grace
        self.db = Database(str(location), sync, PARTS)
        self.location = self.db.location
        self.is_postgres = self.db.is_postgres
        self.dialect = self.db.dialect

    def __repr__(self) -> str:
        return f"Ledger({self.db!r})"

    def close(self) -> None:
        """Close pooled connections and the lock file (before a fork, and at exit)."""
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one-time passwords --------------------------------------------------------------------------
    def add_otp(self, device_id: str, digest: str, now: int, expires_at: int) -> None:
        """Store a new OTP for `device_id`. It works even for a barred (revoked) device: a password the
        operator issues after the revocation is the new credential that lets the device back in."""
        with self.db.transaction() as q:
            q("INSERT INTO otps (digest, device_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
              (digest, device_id, now, expires_at))

    def find_otp(self, digest: str) -> Otp | None:
        found = self.db.select("SELECT digest, device_id, created_at, expires_at, used_at, csr_fingerprint, serial, "
                             "locked_at, voided_at FROM otps WHERE digest = ?", (digest,))
        if not found:
            return None
        d, device, created, expires, used, fp, serial, locked, voided = found[0]
        return Otp(d, device, int(created), int(expires), None if used is None else int(used), fp, serial,
                   None if locked is None else int(locked), None if voided is None else int(voided))

    # -- issuing -------------------------------------------------------------------------------------
    def issue_with_otp(self, device_id: str, digest: str, csr_fingerprint: str, now: int,
                       sign: Callable[[], x509.Certificate | Issued]) -> tuple[Row, bool]:
        """Consume the OTP `digest` of `device_id` and record the certificate `sign()` makes.

        Returns (row, reused): a retry with the same OTP and the same CSR gets the row issued the
        first time and `reused=True`, without calling `sign` (unless that certificate is revoked by now).
        Raises Refusal(401) for an unknown, expired or already used (with another CSR) password,
        Refusal(403) for one issued before an operator revoked the device; nothing is written then.
        """
        return self.db.write(self.otp_issuance(device_id, digest, csr_fingerprint, now, sign))  # type: ignore[no-any-return]

    def otp_issuance(self, device_id: str, digest: str, csr_fingerprint: str, now: int,
                     sign: Callable[[], x509.Certificate | Issued]) -> Callable[[Query], tuple[Row, bool]]:
        """`issue_with_otp`'s transaction as a work for `Database.write` or a `committer.Committer`:
        every rule (the password unused, not voided, not expired; the cap) is decided inside it."""
        def work(q: Query) -> tuple[Row, bool]:
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (device_id,))
            found = q(f"SELECT device_id, expires_at, used_at, csr_fingerprint, serial, voided_at FROM otps "  # noqa: S608
                      f"WHERE digest = ?{self.dialect.for_update}", (digest,))
            if not found or found[0][0] != device_id:
                raise Refusal(401, f"one-time password is not valid for device {device_id!r} (unknown or "
                                   "mistyped; ask the station operator for a new one)")
            _, expires_at, used_at, used_for, serial, voided_at = found[0]
            if used_at is not None:
                if used_for == csr_fingerprint:
                    row = self.row_in(q, serial)
                    if row is not None and row.revocation(now) is None:
                        return row, True
                    raise Refusal(401, f"one-time password for {device_id!r} was used for certificate {serial} "
                                       "which has been revoked; ask for a new one-time password")
                raise Refusal(401, f"one-time password for {device_id!r} was already used for another CSR "
                                   "(a retry must send the same CSR); ask for a new one-time password")
            if voided_at is not None:
                raise Refusal(403, otp_voided_reason(device_id, int(voided_at)))
            if int(expires_at) < now:
                raise Refusal(401, f"one-time password for {device_id!r} expired {now - int(expires_at)} s ago; "
                                   "ask for a new one-time password")
            row = self._insert(q, device_id, "device", csr_fingerprint, now, sign())
            q("UPDATE otps SET used_at = ?, csr_fingerprint = ?, serial = ? WHERE digest = ?",
              (now, csr_fingerprint, row.serial, digest))
            self._cap(q, row, now)
            return row, False

        return work

    def issue(self, device_id: str, csr_fingerprint: str, now: int, sign: Callable[[], x509.Certificate | Issued], *,
              kind: str = "device", reuse: bool = True, predecessor: str | None = None) -> tuple[Row, bool]:
        """Record the certificate `sign()` makes for `device_id`; (row, reused).

        With `reuse`, an unrevoked certificate already issued to this device for the same CSR is
        returned instead (`reused=True`): the answer to a device that retries after a crash.
        `predecessor` (re-enrollment) is the serial of the certificate the device authenticated with:
        Refusal(403) if it is revoked by now (checked inside the transaction, so a revocation racing
        this request wins); otherwise it is superseded once the new certificate is used, or after the
        grace period.
        """
        return self.db.write(self.issuance(device_id, csr_fingerprint, now, sign, kind=kind, reuse=reuse,  # type: ignore[no-any-return]
                                           predecessor=predecessor))

    def issuance(self, device_id: str, csr_fingerprint: str, now: int, sign: Callable[[], x509.Certificate | Issued],
                 *, kind: str = "device", reuse: bool = True,
                 predecessor: str | None = None) -> Callable[[Query], tuple[Row, bool]]:
        """`issue`'s transaction as a work (see `otp_issuance`)."""
        def work(q: Query) -> tuple[Row, bool]:
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (device_id,))
            return self.issue_in(q, device_id, csr_fingerprint, now, sign, kind, reuse, predecessor)

        return work

    def issue_in(self, q: Query, device_id: str, csr_fingerprint: str, now: int,
                 sign: Callable[[], x509.Certificate | Issued], kind: str, reuse: bool,
                 predecessor: str | None) -> tuple[Row, bool]:
        """`issue`'s work inside the caller's transaction `q` (attestation spends its challenge in the same one)."""
        self._sweep(q, now)
        if predecessor is not None:
            before = self.row_in(q, predecessor)
            if before is None:
                raise Refusal(403, f"certificate serial {predecessor} is not in the ledger")
            gone = before.revocation(now)
            if gone is not None:
                raise Refusal(403, revoked_reason(before, *gone))
        if reuse:
            found = q(f"SELECT {_ROW_COLUMNS} FROM certs WHERE device_id = ? AND csr_fingerprint = ? "  # noqa: S608
                      "AND revoked_at IS NULL AND not_after > ? ORDER BY issued_at DESC",
                      (device_id, csr_fingerprint, now))
            reusable = [r for r in map(self._row, found) if r.revocation(now) is None]
            if reusable:
                return reusable[0], True
        row = self._insert(q, device_id, kind, csr_fingerprint, now, sign(), predecessor)
        if predecessor is not None:
            q("UPDATE certs SET supersede_at = ? WHERE serial = ? AND supersede_at IS NULL",
              (now + self.supersede_grace, predecessor))
            self._sweep(q, now)
        if kind == "device":
            self._cap(q, row, now)
        return row, False

    def issue_with_bootstrap(self, device_id: str, csr_fingerprint: str, now: int,
                             sign: Callable[[], x509.Certificate | Issued]) -> tuple[Row, bool]:
        """`issue` for a device that authenticated with a factory bootstrap certificate.

        Refusal(403) if an operator revoked the device and has not re-admitted it (checked in the
        issuing transaction, so a revocation racing this request wins): the bootstrap certificate
        outlives every certificate the station issued, so without this a revoked device (or whoever
        holds its bootstrap key) would enroll again at once. A crash-retry of a barred device is
        refused too, not answered with its revoked certificate.
        """
        return self.db.write(self.bootstrap_issuance(device_id, csr_fingerprint, now, sign))  # type: ignore[no-any-return]

    def bootstrap_issuance(self, device_id: str, csr_fingerprint: str, now: int,
                           sign: Callable[[], x509.Certificate | Issued]) -> Callable[[Query], tuple[Row, bool]]:
        """`issue_with_bootstrap`'s transaction as a work (see `otp_issuance`)."""
        def work(q: Query) -> tuple[Row, bool]:
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (device_id,))
            bar = self.bar_in(q, device_id)
            if bar is not None:
                raise Refusal(403, barred_reason(bar))
            return self.issue_in(q, device_id, csr_fingerprint, now, sign, "device", True, None)

        return work

    def _insert(self, q: Query, device_id: str, kind: str, csr_fingerprint: str, now: int,
                cert: x509.Certificate | Issued, predecessor: str | None = None) -> Row:
        """Record `cert`; an `Issued` (the device template's) brings its serial, subject and validity
        along, any other certificate is read for them."""
        facts = cert if isinstance(cert, Issued) else Issued.of(cert)
        row = Row(serial=serial_hex(facts.serial), device_id=device_id, subject=facts.subject, kind=kind,
                  not_before=facts.not_before, not_after=facts.not_after, csr_fingerprint=csr_fingerprint,
                  issued_at=now, revoked_at=None, cert_der=facts.der, predecessor=predecessor)
        q(f"INSERT INTO certs ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
          (row.serial, row.device_id, row.subject, row.kind, row.not_before, row.not_after, row.csr_fingerprint,
           row.issued_at, row.revoked_at, row.cert_der, row.predecessor, None, None))
        return row

    # -- lineage -------------------------------------------------------------------------------------
    def _cap(self, q: Query, new: Row, now: int) -> None:
        """Supersede the device's oldest valid certificates beyond `max_valid` (the new one stays)."""
        # the serials alone, `Row.revocation(now) is None` written as SQL: no row is read into Python
        valid = q("SELECT serial FROM certs WHERE device_id = ? AND kind = 'device' AND revoked_at IS NULL "
                  "AND not_after > ? AND (supersede_at IS NULL OR supersede_at > ?) AND serial <> ? "
                  "ORDER BY issued_at DESC, serial DESC", (new.device_id, now, now, new.serial))
        for (serial,) in valid[self.max_valid - 1:]:
            q("UPDATE certs SET revoked_at = ?, revoke_reason = ? WHERE serial = ?", (now, SUPERSEDED, serial))

    @staticmethod
    def _sweep(q: Query, now: int) -> None:
        """Turn superseded certificates whose grace period ended into revoked rows (for the CRL)."""
        q("UPDATE certs SET revoked_at = supersede_at, revoke_reason = ? WHERE revoked_at IS NULL "
          "AND supersede_at IS NOT NULL AND supersede_at <= ?", (SUPERSEDED, now))

    def sweep(self, now: int) -> None:
        """Record superseded certificates whose grace period ended as revoked (before writing a CRL)."""
        with self.db.transaction() as q:
            self._sweep(q, now)

    def presented(self, serial: int | str, now: int) -> None:
        """The certificate `serial` authenticated a request: the one it replaced is superseded now."""
        self.db.write(self.presentation(serial, now))

    def presentation(self, serial: int | str, now: int) -> Callable[[Query], None]:
        """`presented`'s transaction as a work (see `otp_issuance`)."""
        key = serial_hex(serial)

        def work(q: Query) -> None:
            row = self.row_in(q, key)
            if row is not None and row.predecessor is not None:
                q("UPDATE certs SET revoked_at = ?, revoke_reason = ? WHERE serial = ? AND revoked_at IS NULL",
                  (now, SUPERSEDED, row.predecessor))

        return work

    # -- reading and revoking ------------------------------------------------------------------------
    @staticmethod
    def _row(values: tuple[Any, ...]) -> Row:
        serial, device_id, subject, kind, nb, na, fp, issued, revoked, der, pred, reason, supersede = values
        return Row(serial, device_id, subject, kind, int(nb), int(na), fp, int(issued),
                   None if revoked is None else int(revoked), bytes(der), pred, reason,
                   None if supersede is None else int(supersede))

    def row_in(self, q: Query, serial: str) -> Row | None:
        """The row of `serial` (ledger key form), read inside the caller's transaction `q`."""
        found = q(f"SELECT {_ROW_COLUMNS} FROM certs WHERE serial = ?", (serial,))  # noqa: S608
        return self._row(found[0]) if found else None

    def get(self, serial: int | str) -> Row | None:
        found = self.db.select(f"SELECT {_ROW_COLUMNS} FROM certs WHERE serial = ?", (serial_hex(serial),))  # noqa: S608
        return self._row(found[0]) if found else None

    def rows(self, kind: str | None = None) -> list[Row]:
        """Every issued certificate (of `kind`, if given), oldest first."""
        with self.db.transaction(write=False) as q:
            if kind:
                found = q(f"SELECT {_ROW_COLUMNS} FROM certs WHERE kind = ? ORDER BY issued_at, serial", (kind,))  # noqa: S608
            else:
                found = q(f"SELECT {_ROW_COLUMNS} FROM certs ORDER BY issued_at, serial", ())  # noqa: S608
        return [self._row(r) for r in found]

    def revoke(self, serial: int | str, now: int, reason: str = "unspecified") -> list[Row]:
        """Revoke a certificate and everything re-enrolled from it, transitively; the rows revoked now.

        A stolen certificate's key may have re-enrolled to the thief's own key, so its descendants go
        too. StationError if the serial is unknown, or it and all its descendants are already revoked.
        A superseded certificate can still be revoked for another reason (its lineage goes with it).
        """
        key = serial_hex(serial)
        check_reason(reason)
        with self.db.transaction() as q:
            row = self.row_in(q, key)
            if row is None:
                raise StationError(f"serial {key} is not in the ledger {self!r} (see `tether-station ledger list`)")
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (row.device_id,))
            self._sweep(q, now)
            done = self._revoke_lineage(q, [key], now, reason)
            if not done:
                raise StationError(f"serial {key} ({row.subject}) and every certificate issued from it are "
                                   f"already revoked (since {row.revoked_at})")
            self._bar_revoked(q, done, now, reason)
        return done

    def revoke_device(self, device_id: str, now: int, reason: str = "unspecified") -> list[Row]:
        """Revoke every certificate of `device_id` (and their lineages); StationError if none is valid."""
        check_reason(reason)
        with self.db.transaction() as q:
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (device_id,))
            self._sweep(q, now)
            serials = [r[0] for r in q("SELECT serial FROM certs WHERE device_id = ?", (device_id,))]
            if not serials:
                raise StationError(f"device {device_id!r} has no certificates in the ledger {self!r}")
            done = self._revoke_lineage(q, serials, now, reason)
            if not done:
                raise StationError(f"every certificate of device {device_id!r} is already revoked")
            self._bar_revoked(q, done, now, reason)
        return done

    # -- barred devices ------------------------------------------------------------------------------
    def _bar_revoked(self, q: Query, revoked: list[Row], now: int, reason: str) -> None:
        for device_id in sorted({r.device_id for r in revoked if r.kind == "device"}):
            schema.bar(q, device_id, now, reason)

    @staticmethod
    def bar_in(q: Query, device_id: str) -> Bar | None:
        """The bar on `device_id`, read inside the caller's transaction `q`."""
        found = q("SELECT device_id, barred_at, reason FROM device_bars WHERE device_id = ?", (device_id,))
        return Bar(found[0][0], int(found[0][1]), found[0][2]) if found else None

    def bar(self, device_id: str) -> Bar | None:
        """The bar on `device_id`, if an operator revoked it and has not re-admitted it."""
        with self.db.transaction(write=False) as q:
            return self.bar_in(q, device_id)

    def bars(self) -> list[Bar]:
        """Every barred device, oldest bar first."""
        with self.db.transaction(write=False) as q:
            found = q("SELECT device_id, barred_at, reason FROM device_bars ORDER BY barred_at, device_id", ())
        return [Bar(d, int(at), r) for d, at, r in found]

    def readmit(self, device_id: str) -> Bar:
        """Lift the bar on `device_id`: its bootstrap certificate enrolls it again. Passwords voided by
        the revocation stay void. Returns the bar lifted; StationError if the device is not barred."""
        with self.db.transaction() as q:
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (device_id,))
            bar = self.bar_in(q, device_id)
            if bar is None:
                raise StationError(f"device {device_id!r} is not barred in the ledger {self!r} (only a device an "
                                   "operator revoked is; see `tether-station ledger barred`)")
            q("DELETE FROM device_bars WHERE device_id = ?", (device_id,))
        return bar

    def _revoke_lineage(self, q: Query, serials: list[str], now: int, reason: str) -> list[Row]:
        done: list[Row] = []
        seen: set[str] = set()
        todo = list(serials)
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            row = self.row_in(q, key)
            if row is None:
                continue
            if row.revoked_at is None:
                q("UPDATE certs SET revoked_at = ?, revoke_reason = ? WHERE serial = ?", (now, reason, key))
                done.append(Row(**{**asdict(row), "revoked_at": now, "revoke_reason": reason}))
            elif row.revoke_reason == SUPERSEDED and reason != SUPERSEDED:
                # superseded, and now known compromised: the CRL says so (same revocation time)
                q("UPDATE certs SET revoke_reason = ? WHERE serial = ?", (reason, key))
                done.append(Row(**{**asdict(row), "revoke_reason": reason}))
            todo += [r[0] for r in q("SELECT serial FROM certs WHERE predecessor = ?", (key,))]
        return done


def check_reason(reason: str) -> str:
    if reason not in REASONS:
        raise StationError(f"revocation reason {reason!r}: expected one of {', '.join(REASONS)}")
    return reason


def revoked_reason(row: Row, when: int, why: str) -> str:
    """The refusal for a request authenticated by (or re-enrolling from) a revoked certificate."""
    what = "was superseded by a newer certificate" if why == SUPERSEDED else f"was revoked ({why})"
    return (f"certificate {row.subject} (serial {row.serial}) {what} at {when}; a revoked lineage cannot "
            "re-enroll: the device must enroll again with a new one-time password")


def otp_voided_reason(device_id: str, when: int) -> str:
    return (f"one-time password for {device_id!r} was issued before the device was revoked (at {when}); the "
            f"operator must issue a new one (`tether-station otp {device_id}`)")


def barred_reason(bar: Bar) -> str:
    """The refusal for a bootstrap-certificate enrollment of a device an operator revoked."""
    return (f"device {bar.device_id!r} was revoked ({bar.reason}) at {bar.barred_at}: its bootstrap certificate "
            f"no longer enrolls it; the operator must issue a new one-time password (`tether-station otp "
            f"{bar.device_id}`) or re-admit the bootstrap certificate (`tether-station readmit {bar.device_id}`)")


def device_of(cert: x509.Certificate) -> str:
    """The device id a certificate was issued to (its CN)."""
    return common_name(cert.subject) or ""
