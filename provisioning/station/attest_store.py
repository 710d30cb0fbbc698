"""The ledger's part of attested enrollment: open credential challenges, the EK allow-list, and the
one transaction that issues against a challenge.

Tables (declared in `schema.ATTEST`, created when the ledger opens; `certs.ek_digest` is one of the
ledger's migrated columns):
  attest_challenges  one open or answered challenge per row: the device id and EK it was made for, the AK
                     public area, the nonce, the SHA-256 of the secret (never the secret), when it
                     expires, and once used the CSR fingerprint and the serial it issued
  ek_allowlist       EK digests an operator registered, with the batch and optionally the one device id
                     the EK may enroll

At most `MAX_OPEN_PER_EK` unanswered challenges per EK are kept (a new start for the same EK and AK
replaces the earlier one), so anyone holding a trusted EK certificate cannot fill the table; answered
ones stay as the record of which credential issued which certificate (a replay is refused by it).
Uses the database's public transaction and the ledger's in-transaction issuing (`Ledger.issue_in`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from provisioning.station.errors import Refusal
from provisioning.station.ledger import Ledger, Row, barred_reason

MAX_OPEN_PER_EK = 4  # unanswered challenges kept per EK (bounds the rows one public EK certificate can add)
_CHALLENGE = ("id, device_id, ek_digest, ak_public, nonce, secret_digest, created_at, expires_at, used_at, "
              "csr_fingerprint, serial")


@dataclass(frozen=True)
class Challenge:
    id: str
    device_id: str
    ek_digest: str
    ak_public: bytes
    nonce: bytes
    secret_digest: str
    created_at: int
    expires_at: int
    used_at: int | None
    csr_fingerprint: str | None
    serial: str | None

    @classmethod
    def of(cls, values: tuple[Any, ...]) -> Challenge:
        cid, device, ek, ak, nonce, digest, created, expires, used, fp, serial = values
        return cls(cid, device, ek, bytes.fromhex(ak), bytes.fromhex(nonce), digest, int(created), int(expires),
                   None if used is None else int(used), fp, serial)


@dataclass(frozen=True)
class Allowed:
    ek_digest: str
    batch: str
    device_id: str | None
    added_at: int


class AttestStore:
    """Attestation state in `ledger` (tables in `schema.ATTEST`); thread-safe as the ledger is."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    # -- the allow-list ----------------------------------------------------------------------------------
    def allow(self, entries: list[tuple[str, str | None]], batch: str, now: int) -> int:
        """Register (ek_digest, device id or None) pairs under `batch`; an EK already listed is moved.
        Returns how many were added or changed."""
        with self.ledger.db.transaction() as q:
            for digest, device_id in entries:
                q("INSERT INTO ek_allowlist (ek_digest, batch, device_id, added_at) VALUES (?, ?, ?, ?) "
                  "ON CONFLICT (ek_digest) DO UPDATE SET batch = excluded.batch, device_id = excluded.device_id, "
                  "added_at = excluded.added_at", (digest, batch, device_id, now))
        return len(entries)

    def disallow(self, digest: str | None = None, batch: str | None = None) -> int:
        """Remove one EK, or every EK of a batch; how many rows went."""
        with self.ledger.db.transaction() as q:
            found = q("SELECT ek_digest FROM ek_allowlist WHERE ek_digest = ? OR batch = ?", (digest, batch))
            q("DELETE FROM ek_allowlist WHERE ek_digest = ? OR batch = ?", (digest, batch))
        return len(found)

    def allowed(self, digest: str) -> Allowed | None:
        with self.ledger.db.transaction(write=False) as q:
            found = q("SELECT ek_digest, batch, device_id, added_at FROM ek_allowlist WHERE ek_digest = ?", (digest,))
        return Allowed(found[0][0], found[0][1], found[0][2], int(found[0][3])) if found else None

    def allow_list(self, batch: str | None = None) -> list[Allowed]:
        with self.ledger.db.transaction(write=False) as q:
            if batch is None:
                found = q("SELECT ek_digest, batch, device_id, added_at FROM ek_allowlist "
                          "ORDER BY batch, added_at, ek_digest", ())
            else:
                found = q("SELECT ek_digest, batch, device_id, added_at FROM ek_allowlist WHERE batch = ? "
                          "ORDER BY added_at, ek_digest", (batch,))
        return [Allowed(d, b, i, int(at)) for d, b, i, at in found]

    # -- EK bindings -------------------------------------------------------------------------------------
    def device_of_ek(self, digest: str) -> str | None:
        """The device an EK already enrolled (one TPM, one device identity), if any."""
        with self.ledger.db.transaction(write=False) as q:
            return self._device_of_ek(q, digest)

    @staticmethod
    def _device_of_ek(q: Any, digest: str) -> str | None:
        found = q("SELECT device_id FROM certs WHERE ek_digest = ? AND kind = 'device' ORDER BY issued_at LIMIT 1",
                  (digest,))
        return str(found[0][0]) if found else None

    def enrolled_otherwise(self, device_id: str, digest: str) -> str | None:
        """How `device_id` already enrolled if not with this EK ("EK sha256:..", or "a one-time password or
        bootstrap certificate"); None when it never did, or only with this EK."""
        with self.ledger.db.transaction(write=False) as q:
            return self._enrolled_otherwise(q, device_id, digest)

    @staticmethod
    def _enrolled_otherwise(q: Any, device_id: str, digest: str) -> str | None:
        found = q("SELECT ek_digest FROM certs WHERE device_id = ? AND kind = 'device' AND (ek_digest IS NULL OR "
                  "ek_digest != ?) ORDER BY issued_at DESC LIMIT 1", (device_id, digest))
        if not found:
            return None
        return f"EK {found[0][0]}" if found[0][0] else "a one-time password or bootstrap certificate"

    def ek_of_devices(self) -> dict[str, str]:
        """device id -> the EK digest of its newest attested certificate (console, exports)."""
        with self.ledger.db.transaction(write=False) as q:
            found = q("SELECT device_id, ek_digest FROM certs WHERE ek_digest IS NOT NULL ORDER BY issued_at", ())
        return {str(d): str(e) for d, e in found}

    # -- challenges --------------------------------------------------------------------------------------
    def open(self, device_id: str, ek_digest: str, ak_public: bytes, nonce: bytes, secret_digest: str,
             now: int, ttl: int) -> Challenge:
        """Record a new challenge. An unanswered one for the same EK and AK is dropped (the device asked
        again; its AK is derived again from the same seed, so a retry is the same pair), and so are
        unanswered ones that expired, and the oldest beyond `MAX_OPEN_PER_EK` for this EK. EK certificates
        are not secret: keying the replacement on the AK too means someone holding a device's EK
        certificate but not its TPM cannot cancel the device's challenge with a start of their own."""
        challenge = Challenge(secrets.token_hex(16), device_id, ek_digest, ak_public, nonce, secret_digest, now,
                              now + ttl, None, None, None)
        with self.ledger.db.transaction() as q:
            q("DELETE FROM attest_challenges WHERE used_at IS NULL AND ((ek_digest = ? AND ak_public = ?) "
              "OR expires_at < ?)", (ek_digest, ak_public.hex(), now))
            stale = q("SELECT id FROM attest_challenges WHERE used_at IS NULL AND ek_digest = ? "
                      "ORDER BY created_at DESC, id LIMIT 100 OFFSET ?", (ek_digest, MAX_OPEN_PER_EK - 1))
            for (old,) in stale:
                q("DELETE FROM attest_challenges WHERE id = ?", (old,))
            q(f"INSERT INTO attest_challenges ({_CHALLENGE}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
              (challenge.id, device_id, ek_digest, ak_public.hex(), nonce.hex(), secret_digest, now, now + ttl,
               None, None, None))
        return challenge

    def find(self, secret_digest: str) -> Challenge | None:
        with self.ledger.db.transaction(write=False) as q:
            found = q(f"SELECT {_CHALLENGE} FROM attest_challenges WHERE secret_digest = ?",  # noqa: S608
                      (secret_digest,))
        return Challenge.of(found[0]) if found else None

    def issue(self, challenge: Challenge, csr_fingerprint: str, now: int, sign: Callable[[], x509.Certificate],
              *, replaces: bool = False) -> tuple[Row, bool]:
        """Spend `challenge` on the certificate `sign()` makes; (row, reused).

        In one transaction, so two requests with one credential cannot both issue: the challenge must be
        unanswered (a retry with the same CSR gets the certificate issued the first time), not expired,
        the device not barred by an operator's revocation, the EK not bound to another device, and the
        device not enrolled before in another way (another EK, a password) unless `replaces` (the
        operator bound this EK to this device id on the allow-list: a replaced TPM).
        """
        ledger = self.ledger
        with ledger.db.transaction() as q:
            if ledger.dialect.lock_device:
                q(ledger.dialect.lock_device, (challenge.device_id,))
            found = q(f"SELECT {_CHALLENGE} FROM attest_challenges WHERE id = ?{ledger.dialect.for_update}",  # noqa: S608
                      (challenge.id,))
            if not found:
                raise Refusal(401, "the TPM credential's challenge was replaced by a newer one for the same EK; "
                                   "start again")
            current = Challenge.of(found[0])
            if current.used_at is not None:
                if current.csr_fingerprint == csr_fingerprint and current.serial:
                    row = ledger.row_in(q, current.serial)
                    if row is not None and row.revocation(now) is None:
                        return row, True
                raise Refusal(401, f"the TPM credential for {current.device_id!r} was already used (at "
                                   f"{current.used_at}, certificate {current.serial}): a credential enrolls once; "
                                   "start a new attestation")
            if current.expires_at < now:
                raise Refusal(401, f"the TPM credential for {current.device_id!r} expired {now - current.expires_at} "
                                   "s ago; start a new attestation")
            bar = ledger.bar_in(q, current.device_id)
            if bar is not None:
                raise Refusal(403, barred_reason(bar))
            bound = self._device_of_ek(q, current.ek_digest)
            if bound is not None and bound != current.device_id:
                raise Refusal(403, ek_bound_reason(current.ek_digest, bound, current.device_id))
            other = None if replaces else self._enrolled_otherwise(q, current.device_id, current.ek_digest)
            if other is not None:
                raise Refusal(403, device_bound_reason(current.device_id, other, current.ek_digest))
            row, _ = ledger.issue_in(q, current.device_id, csr_fingerprint, now, sign, "device", False, None)
            q("UPDATE certs SET ek_digest = ? WHERE serial = ?", (current.ek_digest, row.serial))
            q("UPDATE attest_challenges SET used_at = ?, csr_fingerprint = ?, serial = ? WHERE id = ?",
              (now, csr_fingerprint, row.serial, current.id))
            return row, False


def device_bound_reason(device_id: str, other: str, digest: str) -> str:
    return (f"device {device_id!r} already enrolled with {other}: EK {digest} cannot take its identity over; if "
            f"its TPM was replaced, bind the new EK to it (`tether-station attest allow --device {device_id}`)")


def ek_bound_reason(digest: str, bound: str, asked: str) -> str:
    return (f"EK {digest} already enrolled device {bound!r}: one TPM is one device identity, so it cannot "
            f"enroll {asked!r}")
