"""The issuance ledger: one row per issued certificate, and the hashed one-time passwords.

SQLite (WAL) by default; PostgreSQL (psycopg 3) when several stations share one factory. The same SQL
runs on both; the few differences sit in `_Dialect`. Every issuance is one transaction that
inserts the certificate row and consumes the OTP together, so a station killed mid-request leaves
either both or neither.

Connections are pooled (one per concurrent request, reused), never shared between threads at the
same time, and opened lazily so a pre-forking server opens them after the fork.

On SQLite the writes of the request path (issuing, and marking a certificate presented) go through a
group commit (`groupcommit.py`): requests that arrive while another commit is under way share the
next transaction, each in its own savepoint, so one fsync covers several issuances and nothing is
returned before the COMMIT holding it. PostgreSQL groups commits by itself (`commit_delay`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from provisioning.certs import common_name, subject_of
from provisioning.station.errors import Refusal, StationError
from provisioning.station.groupcommit import GroupCommit

KINDS = ("device", "server", "service")  # service: a reserved identity issued by `issue --service`
DEFAULT_MAX_VALID = 2
DEFAULT_SUPERSEDE_GRACE = 7 * 24 * 3600
SYNC_MODES = ("full", "normal")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS certs (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    kind TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    csr_fingerprint TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    revoked_at BIGINT,
    cert_der {blob} NOT NULL,
    predecessor TEXT,
    revoke_reason TEXT,
    supersede_at BIGINT
);
CREATE INDEX IF NOT EXISTS certs_by_request ON certs (device_id, csr_fingerprint);
CREATE TABLE IF NOT EXISTS otps (
    digest TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    csr_fingerprint TEXT,
    serial TEXT REFERENCES certs (serial),
    locked_at BIGINT,
    voided_at BIGINT
);
CREATE TABLE IF NOT EXISTS device_bars (
    device_id TEXT PRIMARY KEY,
    barred_at BIGINT NOT NULL,
    reason TEXT NOT NULL
);
"""

# Columns added after the first release: (table, column, type). A ledger made before them is
# migrated when it is opened (ALTER TABLE ... ADD COLUMN works alike in SQLite and PostgreSQL).
_ADDED_COLUMNS = (("certs", "predecessor", "TEXT"), ("certs", "revoke_reason", "TEXT"),
                  ("certs", "supersede_at", "BIGINT"), ("otps", "locked_at", "BIGINT"), ("otps", "voided_at", "BIGINT"),
                  ("certs", "ek_digest", "TEXT"))  # ek_digest: the TPM's EK, for attested enrollments

# Interpolated into SQL below: constants only, never input (hence the S608 waivers).
_ROW_COLUMNS = ("serial, device_id, subject, kind, not_before, not_after, csr_fingerprint, issued_at, "
                "revoked_at, cert_der, predecessor, revoke_reason, supersede_at")

# CRL reason names (RFC 5280 5.3.1, as `x509.ReasonFlags` values) an operator may give
REASONS = ("unspecified", "keyCompromise", "affiliationChanged", "superseded", "cessationOfOperation")
SUPERSEDED = "superseded"


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


@dataclass(frozen=True)
class _Dialect:
    placeholder: str
    blob: str
    begin: str | None          # statement that opens a write transaction (None: driver does it)
    for_update: str            # row lock suffix for SELECT
    lock_device: str | None    # serialises requests for one device (same CSR twice at once)


_SQLITE = _Dialect("?", "BLOB", "BEGIN IMMEDIATE", "", None)
_POSTGRES = _Dialect("%s", "BYTEA", None, " FOR UPDATE", "SELECT pg_advisory_xact_lock(hashtext(%s))")

Query = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


class Ledger:
    """The ledger at `location`: a `postgresql://` URL, `sqlite:///path`, or a plain file path."""

    def __init__(self, location: str | Path, sync: str = "full", *, max_valid: int = DEFAULT_MAX_VALID,
                 supersede_grace: int = DEFAULT_SUPERSEDE_GRACE) -> None:
        """`max_valid`: valid certificates one device may hold (older ones are superseded beyond it);
        `supersede_grace`: seconds a re-enrolled certificate stays valid if its successor is never used."""
        if sync not in SYNC_MODES:
            raise StationError(f"ledger sync mode {sync!r}: expected one of {', '.join(SYNC_MODES)}")
        if max_valid < 1:
            raise StationError(f"max_valid_certs {max_valid}: a device must be able to hold at least 1 certificate")
        if supersede_grace < 0:
            raise StationError(f"supersede_grace {supersede_grace}: must be 0 or more seconds")
        self.sync = sync
        self.max_valid = max_valid
        self.supersede_grace = supersede_grace
        self.location = str(location)
        self.is_postgres = self.location.startswith(("postgresql://", "postgres://"))
        self.dialect = _POSTGRES if self.is_postgres else _SQLITE
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = threading.Lock()
        self._lock_fd: int | None = None
        self.group: GroupCommit[Query] = GroupCommit(self._transaction, self._savepoint)
        with self._transaction() as q:
            had_bars = self._has_table(q, "device_bars")
            for statement in _SCHEMA.format(blob=self.dialect.blob).split(";"):
                if statement.strip():
                    q(statement, ())
        self._migrate(bar_revoked=not had_bars)

    def _has_table(self, q: Query, table: str) -> bool:
        if self.is_postgres:
            return bool(q("SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
                          "AND table_name = ?", (table,)))
        return bool(q("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)))

    def _migrate(self, bar_revoked: bool) -> None:
        """Add the columns a ledger from an older station lacks, then the index that needs them.

        `bar_revoked` (the ledger had no `device_bars` yet): stations before it let an operator-revoked
        device back in through its bootstrap certificate or an older password, so every device whose
        newest certificate an operator revoked is barred now, as `revoke` would have done.
        """
        with self._connection() as conn:
            present: dict[str, set[str]] = {}
            for table in {t for t, _, _ in _ADDED_COLUMNS}:
                cur = conn.execute(f"SELECT * FROM {table} WHERE 1 = 0")  # noqa: S608 - constant table names
                present[table] = {getattr(d, "name", None) or d[0] for d in cur.description}
                cur.fetchall()
        with self._transaction() as q:
            for table, column, kind in _ADDED_COLUMNS:
                if column not in present[table]:
                    q(f"ALTER TABLE {table} ADD COLUMN {column} {kind}", ())
            q("CREATE INDEX IF NOT EXISTS certs_by_predecessor ON certs (predecessor)", ())
            if bar_revoked:
                self._bar_revoked_devices(q)

    def _bar_revoked_devices(self, q: Query) -> None:
        """Bar each device whose newest certificate was revoked by an operator (not superseded) and
        that holds no certificate issued since; its unused passwords from before are void. (A revoked
        row without a reason comes from a station older than reasons: only operators revoked then.)"""
        operator = "c.revoked_at IS NOT NULL AND COALESCE(c.revoke_reason, 'unspecified') != ?"
        found = q(f"SELECT c.device_id, MAX(c.revoked_at) FROM certs c WHERE c.kind = 'device' AND {operator} "  # noqa: S608
                  "GROUP BY c.device_id", (SUPERSEDED,))
        for device_id, revoked_at in found:
            if q("SELECT 1 FROM certs WHERE device_id = ? AND kind = 'device' AND issued_at > ?",
                 (device_id, int(revoked_at))):
                continue
            reason = q(f"SELECT COALESCE(c.revoke_reason, 'unspecified') FROM certs c WHERE c.device_id = ? "  # noqa: S608
                       f"AND c.revoked_at = ? AND {operator}", (device_id, int(revoked_at), SUPERSEDED))[0][0]
            self._bar(q, device_id, int(revoked_at), str(reason))

    def __repr__(self) -> str:
        where = self.location.split("@")[-1] if self.is_postgres else self.location  # no password in logs
        return f"Ledger({where})"

    # -- connections ---------------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self.is_postgres:
            try:
                import psycopg
            except ImportError as exc:
                raise StationError(f"a PostgreSQL ledger needs psycopg: {exc} (pip install 'tether[station]')") \
                    from exc
            try:
                return psycopg.connect(self.location, autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                raise StationError(f"{self!r}: cannot connect to PostgreSQL: {exc}") from exc
        path = self.location.removeprefix("sqlite://")
        try:
            conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL (default): a commit is on disk before the certificate leaves the station, so a power
            # cut cannot forget a certificate a device already holds. NORMAL: still atomic and
            # consistent (a killed station leaves no half rows), but a power cut may roll back the last
            # commits; it saves one fsync per enrollment (station.toml ledger_sync).
            conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StationError(f"{path}: cannot open the SQLite ledger: {exc}") from exc
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        ok = False
        try:
            yield conn
            ok = True
        except Refusal:
            ok = True  # refused inside a rolled-back transaction: the connection is clean
            raise
        finally:
            if ok:
                self._pool.put(conn)
            else:  # a connection that saw an error may be mid-transaction: drop it
                with contextlib.suppress(Exception):
                    conn.close()

    @contextlib.contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Query]:
        """One transaction; commits when the block ends, rolls back on any exception.

        SQLite: a write transaction takes the database's write lock up front (BEGIN IMMEDIATE), so two
        requests cannot both read "OTP unused" and both issue; reads take no lock (WAL readers).
        """
        with self._connection() as conn:
            def q(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                if self.is_postgres:
                    sql = sql.replace("?", "%s")
                cur = conn.execute(sql, tuple(params))
                return list(cur.fetchall()) if cur.description else []

            if self.is_postgres:
                with conn.transaction():
                    yield q
                return
            with self._sqlite_writer() if write else contextlib.nullcontext():
                conn.execute(self.dialect.begin if write else "BEGIN")
                try:
                    yield q
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")

    @contextlib.contextmanager
    def _sqlite_writer(self) -> Iterator[None]:
        """Queue SQLite writers on a lock, in this process and across the station's worker processes.

        SQLite's own busy handler polls with sleeps of up to 100 ms, which under load turns into idle
        CPUs and a long latency tail; a thread lock plus flock() on `<db>.lock` wakes the next writer
        the moment the previous one commits. Writers that skip it are still safe (SQLite's lock).
        """
        with self._writer:
            if self._lock_fd is None:
                path = self.location.removeprefix("sqlite://") + ".lock"
                self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @staticmethod
    @contextlib.contextmanager
    def _savepoint(q: Query) -> Iterator[None]:
        """One issuance inside a shared transaction: rolled back alone when it raises (group commit)."""
        q("SAVEPOINT issuance", ())
        try:
            yield
        except BaseException:
            q("ROLLBACK TO SAVEPOINT issuance", ())
            q("RELEASE SAVEPOINT issuance", ())
            raise
        q("RELEASE SAVEPOINT issuance", ())

    def _write(self, work: Callable[[Query], Any]) -> Any:
        """Run `work(q)` in a write transaction of the request path and return its result once that
        transaction is committed: SQLite shares the transaction (and its fsync) with concurrent
        requests (group commit); PostgreSQL runs one transaction per call."""
        if self.is_postgres:
            with self._transaction() as q:
                return work(q)
        return self.group.run(work)

    def _select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """One SELECT on its own (autocommit: the statement is its own read transaction), without the
        BEGIN and COMMIT round trips of `_transaction`; for lookups made on every request."""
        with self._connection() as conn:
            cur = conn.execute(sql.replace("?", "%s") if self.is_postgres else sql, tuple(params))
            return list(cur.fetchall())

    def close(self) -> None:
        """Close pooled connections and the lock file (before a fork, and at exit)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        while True:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()

    # -- one-time passwords --------------------------------------------------------------------------
    def add_otp(self, device_id: str, digest: str, now: int, expires_at: int) -> None:
        """Store a new OTP for `device_id`. It works even for a barred (revoked) device: a password the
        operator issues after the revocation is the new credential that lets the device back in."""
        with self._transaction() as q:
            q("INSERT INTO otps (digest, device_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
              (digest, device_id, now, expires_at))

    def find_otp(self, digest: str) -> Otp | None:
        found = self._select("SELECT digest, device_id, created_at, expires_at, used_at, csr_fingerprint, serial, "
                             "locked_at, voided_at FROM otps WHERE digest = ?", (digest,))
        if not found:
            return None
        d, device, created, expires, used, fp, serial, locked, voided = found[0]
        return Otp(d, device, int(created), int(expires), None if used is None else int(used), fp, serial,
                   None if locked is None else int(locked), None if voided is None else int(voided))

    # -- issuing -------------------------------------------------------------------------------------
    def issue_with_otp(self, device_id: str, digest: str, csr_fingerprint: str, now: int,
                       sign: Callable[[], x509.Certificate]) -> tuple[Row, bool]:
        """Consume the OTP `digest` of `device_id` and record the certificate `sign()` makes.

        Returns (row, reused): a retry with the same OTP and the same CSR gets the row issued the
        first time and `reused=True`, without signing again (unless that certificate is revoked by now).
        Raises Refusal(401) for an unknown, expired or already used (with another CSR) password,
        Refusal(403) for one issued before an operator revoked the device; nothing is written then.
        """
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
                    row = self._get(q, serial)
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

        return self._write(work)  # type: ignore[no-any-return]

    def issue(self, device_id: str, csr_fingerprint: str, now: int, sign: Callable[[], x509.Certificate], *,
              kind: str = "device", reuse: bool = True, predecessor: str | None = None) -> tuple[Row, bool]:
        """Record the certificate `sign()` makes for `device_id`; (row, reused).

        With `reuse`, an unrevoked certificate already issued to this device for the same CSR is
        returned instead (`reused=True`): the answer to a device that retries after a crash.
        `predecessor` (re-enrollment) is the serial of the certificate the device authenticated with:
        Refusal(403) if it is revoked by now (checked inside the transaction, so a revocation racing
        this request wins); otherwise it is superseded once the new certificate is used, or after the
        grace period.
        """
        def work(q: Query) -> tuple[Row, bool]:
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (device_id,))
            return self._issue(q, device_id, csr_fingerprint, now, sign, kind, reuse, predecessor)

        return self._write(work)  # type: ignore[no-any-return]

    def _issue(self, q: Query, device_id: str, csr_fingerprint: str, now: int, sign: Callable[[], x509.Certificate],
               kind: str, reuse: bool, predecessor: str | None) -> tuple[Row, bool]:
        self._sweep(q, now)
        if predecessor is not None:
            before = self._get(q, predecessor)
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
                             sign: Callable[[], x509.Certificate]) -> tuple[Row, bool]:
        """`issue` for a device that authenticated with a factory bootstrap certificate.

        Refusal(403) if an operator revoked the device and has not re-admitted it (checked in the
        issuing transaction, so a revocation racing this request wins): the bootstrap certificate
        outlives every certificate the station issued, so without this a revoked device (or whoever
        holds its bootstrap key) would enroll again at once. A crash-retry of a barred device is
        refused too, not answered with its revoked certificate.
        """
        def work(q: Query) -> tuple[Row, bool]:
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (device_id,))
            bar = self._get_bar(q, device_id)
            if bar is not None:
                raise Refusal(403, barred_reason(bar))
            return self._issue(q, device_id, csr_fingerprint, now, sign, "device", True, None)

        return self._write(work)  # type: ignore[no-any-return]

    def _insert(self, q: Query, device_id: str, kind: str, csr_fingerprint: str, now: int,
                cert: x509.Certificate, predecessor: str | None = None) -> Row:
        row = Row(serial=serial_hex(cert.serial_number), device_id=device_id, subject=subject_of(cert), kind=kind,
                  not_before=int(cert.not_valid_before_utc.timestamp()),
                  not_after=int(cert.not_valid_after_utc.timestamp()), csr_fingerprint=csr_fingerprint,
                  issued_at=now, revoked_at=None, cert_der=cert.public_bytes(Encoding.DER), predecessor=predecessor)
        q(f"INSERT INTO certs ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
          (row.serial, row.device_id, row.subject, row.kind, row.not_before, row.not_after, row.csr_fingerprint,
           row.issued_at, row.revoked_at, row.cert_der, row.predecessor, None, None))
        return row

    # -- lineage -------------------------------------------------------------------------------------
    def _cap(self, q: Query, new: Row, now: int) -> None:
        """Supersede the device's oldest valid certificates beyond `max_valid` (the new one stays)."""
        found = q(f"SELECT {_ROW_COLUMNS} FROM certs WHERE device_id = ? AND kind = 'device' "  # noqa: S608
                  "AND revoked_at IS NULL AND not_after > ? ORDER BY issued_at DESC, serial DESC",
                  (new.device_id, now))
        valid = [r for r in map(self._row, found) if r.revocation(now) is None and r.serial != new.serial]
        for old in valid[self.max_valid - 1:]:
            q("UPDATE certs SET revoked_at = ?, revoke_reason = ? WHERE serial = ?", (now, SUPERSEDED, old.serial))

    @staticmethod
    def _sweep(q: Query, now: int) -> None:
        """Turn superseded certificates whose grace period ended into revoked rows (for the CRL)."""
        q("UPDATE certs SET revoked_at = supersede_at, revoke_reason = ? WHERE revoked_at IS NULL "
          "AND supersede_at IS NOT NULL AND supersede_at <= ?", (SUPERSEDED, now))

    def sweep(self, now: int) -> None:
        """Record superseded certificates whose grace period ended as revoked (before writing a CRL)."""
        with self._transaction() as q:
            self._sweep(q, now)

    def presented(self, serial: int | str, now: int) -> None:
        """The certificate `serial` authenticated a request: the one it replaced is superseded now."""
        key = serial_hex(serial)

        def work(q: Query) -> None:
            row = self._get(q, key)
            if row is not None and row.predecessor is not None:
                q("UPDATE certs SET revoked_at = ?, revoke_reason = ? WHERE serial = ? AND revoked_at IS NULL",
                  (now, SUPERSEDED, row.predecessor))

        self._write(work)

    # -- reading and revoking ------------------------------------------------------------------------
    @staticmethod
    def _row(values: tuple[Any, ...]) -> Row:
        serial, device_id, subject, kind, nb, na, fp, issued, revoked, der, pred, reason, supersede = values
        return Row(serial, device_id, subject, kind, int(nb), int(na), fp, int(issued),
                   None if revoked is None else int(revoked), bytes(der), pred, reason,
                   None if supersede is None else int(supersede))

    def _get(self, q: Query, serial: str) -> Row | None:
        found = q(f"SELECT {_ROW_COLUMNS} FROM certs WHERE serial = ?", (serial,))  # noqa: S608
        return self._row(found[0]) if found else None

    def get(self, serial: int | str) -> Row | None:
        found = self._select(f"SELECT {_ROW_COLUMNS} FROM certs WHERE serial = ?", (serial_hex(serial),))  # noqa: S608
        return self._row(found[0]) if found else None

    def rows(self, kind: str | None = None) -> list[Row]:
        """Every issued certificate (of `kind`, if given), oldest first."""
        with self._transaction(write=False) as q:
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
        with self._transaction() as q:
            row = self._get(q, key)
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
        with self._transaction() as q:
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
            self._bar(q, device_id, now, reason)

    @staticmethod
    def _bar(q: Query, device_id: str, now: int, reason: str) -> None:
        """Bar `device_id` from first enrollment (bootstrap certificate) and void its unused passwords:
        an operator's revocation holds until the operator issues a new credential."""
        q("INSERT INTO device_bars (device_id, barred_at, reason) VALUES (?, ?, ?) ON CONFLICT (device_id) "
          "DO UPDATE SET barred_at = excluded.barred_at, reason = excluded.reason", (device_id, now, reason))
        q("UPDATE otps SET voided_at = ? WHERE device_id = ? AND used_at IS NULL AND voided_at IS NULL",
          (now, device_id))

    @staticmethod
    def _get_bar(q: Query, device_id: str) -> Bar | None:
        found = q("SELECT device_id, barred_at, reason FROM device_bars WHERE device_id = ?", (device_id,))
        return Bar(found[0][0], int(found[0][1]), found[0][2]) if found else None

    def bar(self, device_id: str) -> Bar | None:
        """The bar on `device_id`, if an operator revoked it and has not re-admitted it."""
        with self._transaction(write=False) as q:
            return self._get_bar(q, device_id)

    def bars(self) -> list[Bar]:
        """Every barred device, oldest bar first."""
        with self._transaction(write=False) as q:
            found = q("SELECT device_id, barred_at, reason FROM device_bars ORDER BY barred_at, device_id", ())
        return [Bar(d, int(at), r) for d, at, r in found]

    def readmit(self, device_id: str) -> Bar:
        """Lift the bar on `device_id`: its bootstrap certificate enrolls it again. Passwords voided by
        the revocation stay void. Returns the bar lifted; StationError if the device is not barred."""
        with self._transaction() as q:
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (device_id,))
            bar = self._get_bar(q, device_id)
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
            row = self._get(q, key)
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
