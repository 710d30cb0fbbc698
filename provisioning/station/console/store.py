"""What the console keeps in the ledger beside the certificates: operators, the audit trail, OTP batches.

The tables (`console_operators`, `console_audit`, `console_batches`, `console_batch_devices`, one
index on `certs (issued_at)` for the live page's rates) are declared in `schema.CONSOLE` and made when
the ledger opens; refusals (`est_events`) are the EST server's records (`refusals`), read here.
Columns of `certs` and `otps` other work adds (a predecessor serial, OTP failure and lockout counters)
are read when present and ignored when absent. SQLite and PostgreSQL alike, through the database's
public transactions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from provisioning.station.errors import StationError
from provisioning.station.ledger import Ledger, Row, serial_hex

# the audit kinds live with the migration that classifies old rows by them
from provisioning.station.schema import ADMIN as ADMIN
from provisioning.station.schema import AUDIT_KINDS as AUDIT_KINDS
from provisioning.station.schema import READ as READ
from provisioning.station.schema import REFUSED as REFUSED

ROLES = ("admin", "readonly")
CLI_NAME = "cli"  # the audit trail's name for the command line (`cli USER@HOST`), never an operator's

# What an audit row records. `admin` rows (something changed: revocations, batches and their hand-overs,
# operators added or revoked) are never pruned and have a view of their own, so no amount of other
# traffic (exports, refused requests, even from a revoked operator) can push them out of sight.
AUDIT_KEEP = 100_000   # newest `read` and `refused` rows kept; older ones are pruned (admin rows never are)
_PRUNE_EVERY = 1000    # prune when a row id is a multiple of this: one DELETE per thousand rows


@dataclass(frozen=True)
class Operator:
    serial: str
    name: str
    role: str
    created_at: int
    not_after: int
    revoked_at: int | None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: int
    who: str
    action: str
    detail: str
    address: str
    outcome: str
    kind: str


@dataclass(frozen=True)
class AuditPage:
    """Audit rows newest first; `older` is the cursor of the next page (None on the last one)."""

    entries: list[AuditEntry]
    older: int | None


@dataclass(frozen=True)
class Batch:
    id: int
    pattern: str
    total: int
    made: int
    created_at: int
    expires_at: int
    created_by: str
    enrolled: int = 0

    @property
    def done(self) -> bool:
        return self.made >= self.total


@dataclass(frozen=True)
class LiveEvent:
    """One line of the live page: an issuance (status 200) or a refusal."""

    at: int
    device_id: str
    status: int
    kind: str          # "first boot", "renewal" or the EST operation of a refusal
    serial: str
    reason: str
    key: str           # unique per event, for the page to skip what it already shows

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, "device_id": self.device_id, "status": self.status, "kind": self.kind,
                "serial": self.serial, "reason": self.reason, "key": self.key,
                "time": time.strftime("%H:%M:%S", time.gmtime(self.at))}


class ConsoleStore:
    """The console's view of one ledger. Cheap to make; its tables exist once the ledger is open."""

    def __init__(self, ledger: Ledger, audit_keep: int = AUDIT_KEEP) -> None:
        self.ledger = ledger
        self.audit_keep = audit_keep
        self.cert_columns = self._columns("certs")
        self.otp_columns = self._columns("otps")

    def _columns(self, table: str) -> set[str]:
        with self.ledger.db.transaction(write=False) as q:
            return self.ledger.db.columns(q, table)

    @property
    def predecessor_column(self) -> str | None:
        """The certs column naming a certificate's predecessor serial, where the ledger has one."""
        return next((c for c in sorted(self.cert_columns) if "predecessor" in c), None)

    # -- operators -----------------------------------------------------------------------------------
    def add_operator(self, serial: str, name: str, role: str, now: int, not_after: int, cert_der: bytes) -> None:
        if role not in ROLES:
            raise StationError(f"--role {role!r}: expected one of {', '.join(ROLES)}")
        with self.ledger.db.transaction() as q:
            q("INSERT INTO console_operators (serial, name, role, created_at, not_after, cert_der) "
              "VALUES (?, ?, ?, ?, ?, ?)", (serial, name, role, now, not_after, cert_der))

    def operators(self) -> list[Operator]:
        with self.ledger.db.transaction(write=False) as q:
            found = q("SELECT serial, name, role, created_at, not_after, revoked_at FROM console_operators "
                      "ORDER BY created_at, name", ())
        return [Operator(s, n, r, int(c), int(na), None if rv is None else int(rv)) for s, n, r, c, na, rv in found]

    def operator(self, serial: int | str) -> Operator | None:
        key = serial_hex(serial)
        return next((o for o in self.operators() if o.serial == key), None)

    def active_operators(self, name: str) -> list[Operator]:
        return [o for o in self.operators() if o.name == name and o.revoked_at is None]

    def revoke_operator(self, name: str, now: int) -> list[Operator]:
        """Revoke every certificate of operator `name`; StationError if it holds none."""
        found = self.active_operators(name)
        if not found:
            known = sorted({o.name for o in self.operators() if o.revoked_at is None})
            raise StationError(f"operator {name!r} holds no unrevoked console certificate "
                               f"(active operators: {', '.join(known) or 'none'})")
        with self.ledger.db.transaction() as q:
            for o in found:
                q("UPDATE console_operators SET revoked_at = ? WHERE serial = ?", (now, o.serial))
        return found

    # -- audit ---------------------------------------------------------------------------------------
    def audit(self, who: str, action: str, detail: str, address: str, kind: str, now: int | None = None) -> None:
        """Write one audit row of `kind` (AUDIT_KINDS; a `refused` row has the outcome "refused").
        Every thousandth row prunes `read` and `refused` rows beyond the newest `audit_keep`."""
        if kind not in AUDIT_KINDS:
            raise StationError(f"audit kind {kind!r}: expected one of {', '.join(AUDIT_KINDS)}")
        outcome = "refused" if kind == REFUSED else "ok"
        with self.ledger.db.transaction() as q:
            q("INSERT INTO console_audit (at, who, action, detail, address, outcome, kind) "
              "VALUES (?, ?, ?, ?, ?, ?, ?)",
              (int(time.time()) if now is None else now, who, action, detail[:1000], address, outcome, kind))
            if kind != ADMIN:
                last = int(q("SELECT MAX(id) FROM console_audit", ())[0][0])
                if last % _PRUNE_EVERY == 0:
                    self._prune_audit(q)

    def _prune_audit(self, q: Any) -> None:
        """Drop the `read` and `refused` rows older than the newest `audit_keep` of them (admin rows stay)."""
        edge = q("SELECT id FROM console_audit WHERE kind != ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                 (ADMIN, self.audit_keep))
        if edge:
            q("DELETE FROM console_audit WHERE kind != ? AND id <= ?", (ADMIN, int(edge[0][0])))

    def audit_log(self, kind: str = "", operator: str = "", before: int | None = None,
                  limit: int = 100) -> AuditPage:
        """Audit rows newest first: of one `kind` (all when empty), by one `operator` name (the console
        operator or "cli" for the command line; all when empty), with ids below the cursor `before`."""
        if kind and kind not in AUDIT_KINDS:
            raise StationError(f"kind {kind!r}: expected one of {', '.join(AUDIT_KINDS)}")
        sql = "SELECT id, at, who, action, detail, address, outcome, kind FROM console_audit WHERE 1 = 1"
        params: list[Any] = []
        if kind:
            sql += " AND kind = ?"
            params.append(kind)
        if operator:
            # `who` is "NAME (role, serial …)" for an operator and "cli USER@HOST" for the command line
            prefix = operator + " " if operator == CLI_NAME else operator + " ("
            sql += " AND substr(who, 1, ?) = ?"
            params += [len(prefix), prefix]
        if before is not None:
            sql += " AND id < ?"
            params.append(before)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit + 1)
        with self.ledger.db.transaction(write=False) as q:
            found = q(sql, params)
        entries = [AuditEntry(int(i), int(a), w, ac, d, ad, o, k) for i, a, w, ac, d, ad, o, k in found[:limit]]
        return AuditPage(entries, entries[-1].id if len(found) > limit else None)

    # -- devices -------------------------------------------------------------------------------------
    def search(self, prefix: str = "", serial: str = "", since: int | None = None, until: int | None = None,
               limit: int = 200) -> list[Row]:
        """Device certificates whose device id starts with `prefix`, serial starts with `serial`, issued
        in [since, until); newest first."""
        sql = "SELECT serial FROM certs WHERE kind = 'device'"
        params: list[Any] = []
        if prefix:
            sql += " AND substr(device_id, 1, ?) = ?"
            params += [len(prefix), prefix]
        if serial:
            sql += " AND serial LIKE ?"
            params.append(serial_hex(serial).replace("%", "") + "%")
        if since is not None:
            sql += " AND issued_at >= ?"
            params.append(since)
        if until is not None:
            sql += " AND issued_at < ?"
            params.append(until)
        sql += " ORDER BY issued_at DESC, serial LIMIT ?"
        params.append(limit)
        with self.ledger.db.transaction(write=False) as q:
            serials = [r[0] for r in q(sql, params)]
        return self._rows(serials)

    def _rows(self, serials: Sequence[str]) -> list[Row]:
        rows = []
        for s in serials:
            row = self.ledger.get(s)
            if row is not None:
                rows.append(row)
        return rows

    def history(self, device_id: str) -> list[tuple[Row, str | None]]:
        """Every certificate of `device_id`, oldest first, with its predecessor serial (None when the
        ledger does not record one)."""
        column = self.predecessor_column
        with self.ledger.db.transaction(write=False) as q:
            found = q(f"SELECT serial, {column or 'NULL'} FROM certs WHERE device_id = ? "  # noqa: S608 - column name from the schema
                      "ORDER BY issued_at, serial", (device_id,))
        preds = {s: p for s, p in found}
        return [(r, preds.get(r.serial)) for r in self._rows([s for s, _ in found])]

    def ek_digests(self, device_id: str | None = None) -> dict[str, str]:
        """serial -> EK digest of each TPM-attested certificate (of `device_id`, if given)."""
        with self.ledger.db.transaction(write=False) as q:
            if device_id is None:
                found = q("SELECT serial, ek_digest FROM certs WHERE ek_digest IS NOT NULL", ())
            else:
                found = q("SELECT serial, ek_digest FROM certs WHERE device_id = ? AND ek_digest IS NOT NULL",
                          (device_id,))
        return {str(serial): str(digest) for serial, digest in found}

    def revoke(self, serials: Iterable[str], now: int, reason: str = "unspecified") -> list[Row]:
        """Revoke each serial not yet revoked for `reason` (one of `ledger.REASONS`; the ledger's own
        `revoke`, so whatever it also revokes, such as certificates issued from it, goes with it);
        returns what this call revoked."""
        done = []
        for s in serials:
            row = self.ledger.get(s)
            if row is not None and row.revoked_at is None:
                done.extend(self.ledger.revoke(s, now, reason))
        return done

    # -- live ----------------------------------------------------------------------------------------
    def live(self, since: int, limit: int = 100) -> list[LiveEvent]:
        """Issuances and refusals at or after `since` (Unix seconds), newest first."""
        with self.ledger.db.transaction(write=False) as q:
            issued = q("SELECT c.serial, c.device_id, c.issued_at, "
                       "(SELECT COUNT(*) FROM otps o WHERE o.serial = c.serial), "
                       "(SELECT COUNT(*) FROM certs p WHERE p.device_id = c.device_id AND p.kind = 'device' "
                       "AND p.issued_at < c.issued_at) "
                       "FROM certs c WHERE c.kind = 'device' AND c.issued_at >= ? "
                       "ORDER BY c.issued_at DESC LIMIT ?", (since, limit))
            refused = q("SELECT id, at, operation, device_id, status, reason FROM est_events WHERE at >= ? "
                        "ORDER BY id DESC LIMIT ?", (since, limit))
        out = [LiveEvent(int(at), dev, 200, "first boot" if int(by_otp) or not int(earlier) else "renewal",
                         serial, "", f"c{serial}") for serial, dev, at, by_otp, earlier in issued]
        out += [LiveEvent(int(at), dev, int(status), op, "", reason, f"r{i}")
                for i, at, op, dev, status, reason in refused]
        out.sort(key=lambda e: e.at, reverse=True)
        return out[:limit]

    def counters(self, now: int) -> dict[str, int]:
        """Rates over the last minute and the OTP failure and lockout counters for the live page."""
        minute = now - 60
        with self.ledger.db.transaction(write=False) as q:
            issued = int(q("SELECT COUNT(*) FROM certs WHERE kind = 'device' AND issued_at >= ?", (minute,))[0][0])
            # a summary row stands for `refusals` refusals (provisioning/station/refusals.py)
            refused = int(q("SELECT COALESCE(SUM(refusals), 0) FROM est_events WHERE at >= ?", (minute,))[0][0])
            otp_failures = int(q("SELECT COALESCE(SUM(refusals), 0) FROM est_events WHERE status = 401 "
                                 "AND operation = 'simpleenroll' AND reason LIKE ?",
                                 ("%one-time password%",))[0][0])  # psycopg reads % in SQL
            lockouts = self._lockouts(q)
        return {"issued_per_min": issued, "refused_per_min": refused, "otp_failures": otp_failures,
                "lockouts": lockouts if lockouts is not None else -1}

    def _lockouts(self, q: Any) -> int | None:
        """OTPs locked after repeated failures, when the ledger keeps such a column (None otherwise)."""
        column = next((c for c in sorted(self.otp_columns) if "lock" in c), None)
        if column is None:
            return None
        return int(q(f"SELECT COUNT(*) FROM otps WHERE {column} IS NOT NULL AND {column} != 0", ())[0][0])  # noqa: S608

    # -- batches -------------------------------------------------------------------------------------
    def create_batch(self, pattern: str, device_ids: Sequence[str], now: int, expires_at: int, who: str) -> int:
        with self.ledger.db.transaction() as q:
            if self.ledger.is_postgres:
                batch_id = int(q("INSERT INTO console_batches (pattern, total, made, created_at, expires_at, "
                                 "created_by) VALUES (?, ?, 0, ?, ?, ?) RETURNING id",
                                 (pattern, len(device_ids), now, expires_at, who))[0][0])
            else:
                q("INSERT INTO console_batches (pattern, total, made, created_at, expires_at, created_by) "
                  "VALUES (?, ?, 0, ?, ?, ?)", (pattern, len(device_ids), now, expires_at, who))
                batch_id = int(q("SELECT last_insert_rowid()", ())[0][0])
            for d in device_ids:
                q("INSERT INTO console_batch_devices (batch_id, device_id) VALUES (?, ?)", (batch_id, d))
        return batch_id

    def add_batch_otps(self, batch_id: int, otps: Sequence[tuple[str, str]], now: int, expires_at: int) -> None:
        """Store (device id, OTP digest) pairs of a batch in one transaction and advance its progress;
        the same rows `Ledger.add_otp` writes."""
        with self.ledger.db.transaction() as q:
            for device_id, digest in otps:
                q("INSERT INTO otps (digest, device_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                  (digest, device_id, now, expires_at))
            q("UPDATE console_batches SET made = made + ? WHERE id = ?", (len(otps), batch_id))

    def batches(self, limit: int = 50) -> list[Batch]:
        with self.ledger.db.transaction(write=False) as q:
            ids = [int(r[0]) for r in q("SELECT id FROM console_batches ORDER BY id DESC LIMIT ?", (limit,))]
        return [b for b in (self.batch(i) for i in ids) if b is not None]

    def batch(self, batch_id: int) -> Batch | None:
        """A batch with how many of its devices hold a certificate issued since the batch was made."""
        with self.ledger.db.transaction(write=False) as q:
            found = q("SELECT id, pattern, total, made, created_at, expires_at, created_by FROM console_batches "
                      "WHERE id = ?", (batch_id,))
            if not found:
                return None
            i, pattern, total, made, created, expires, who = found[0]
            enrolled = q("SELECT COUNT(*) FROM console_batch_devices b WHERE b.batch_id = ? AND EXISTS "
                         "(SELECT 1 FROM certs c WHERE c.device_id = b.device_id AND c.kind = 'device' "
                         "AND c.issued_at >= ?)", (batch_id, int(created)))[0][0]
        return Batch(int(i), pattern, int(total), int(made), int(created), int(expires), who, int(enrolled))
