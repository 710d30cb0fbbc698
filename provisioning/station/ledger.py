"""The issuance ledger: one row per issued certificate, and the hashed one-time passwords.

SQLite (WAL) by default; PostgreSQL (psycopg 3) when several stations share one factory. The same SQL
runs on both; the few differences sit in `_Dialect`. Every issuance is one transaction that
inserts the certificate row and consumes the OTP together, so a station killed mid-request leaves
either both or neither.

Connections are pooled (one per concurrent request, reused), never shared between threads at the
same time, and opened lazily so a pre-forking server opens them after the fork.
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

KINDS = ("device", "server")
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
    cert_der {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS certs_by_request ON certs (device_id, csr_fingerprint);
CREATE TABLE IF NOT EXISTS otps (
    digest TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    csr_fingerprint TEXT,
    serial TEXT REFERENCES certs (serial)
);
"""

# Interpolated into SQL below: constants only, never input (hence the S608 waivers).
_ROW_COLUMNS = ("serial, device_id, subject, kind, not_before, not_after, csr_fingerprint, issued_at, "
                "revoked_at, cert_der")


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

    def __init__(self, location: str | Path, sync: str = "full") -> None:
        if sync not in SYNC_MODES:
            raise StationError(f"ledger sync mode {sync!r}: expected one of {', '.join(SYNC_MODES)}")
        self.sync = sync
        self.location = str(location)
        self.is_postgres = self.location.startswith(("postgresql://", "postgres://"))
        self.dialect = _POSTGRES if self.is_postgres else _SQLITE
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = threading.Lock()
        self._lock_fd: int | None = None
        with self._transaction() as q:
            for statement in _SCHEMA.format(blob=self.dialect.blob).split(";"):
                if statement.strip():
                    q(statement, ())

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
        with self._transaction() as q:
            q("INSERT INTO otps (digest, device_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
              (digest, device_id, now, expires_at))

    def find_otp(self, digest: str) -> Otp | None:
        with self._transaction(write=False) as q:
            found = q("SELECT digest, device_id, created_at, expires_at, used_at, csr_fingerprint, serial "
                      "FROM otps WHERE digest = ?", (digest,))
        if not found:
            return None
        d, device, created, expires, used, fp, serial = found[0]
        return Otp(d, device, int(created), int(expires), None if used is None else int(used), fp, serial)

    # -- issuing -------------------------------------------------------------------------------------
    def issue_with_otp(self, device_id: str, digest: str, csr_fingerprint: str, now: int,
                       sign: Callable[[], x509.Certificate]) -> tuple[Row, bool]:
        """Consume the OTP `digest` of `device_id` and record the certificate `sign()` makes.

        Returns (row, reused): a retry with the same OTP and the same CSR gets the row issued the
        first time and `reused=True`, without signing again. Raises Refusal(401) for an unknown,
        expired or already used (with another CSR) password; nothing is written then.
        """
        with self._transaction() as q:
            found = q(f"SELECT device_id, expires_at, used_at, csr_fingerprint, serial FROM otps WHERE digest = ?"  # noqa: S608
                      f"{self.dialect.for_update}", (digest,))
            if not found or found[0][0] != device_id:
                raise Refusal(401, f"one-time password is not valid for device {device_id!r} (unknown or "
                                   "mistyped; ask the station operator for a new one)")
            _, expires_at, used_at, used_for, serial = found[0]
            if used_at is not None:
                if used_for == csr_fingerprint:
                    row = self._get(q, serial)
                    if row is not None and row.revoked_at is None:
                        return row, True
                    raise Refusal(401, f"one-time password for {device_id!r} was used for certificate {serial} "
                                       "which has been revoked; ask for a new one-time password")
                raise Refusal(401, f"one-time password for {device_id!r} was already used for another CSR "
                                   "(a retry must send the same CSR); ask for a new one-time password")
            if int(expires_at) < now:
                raise Refusal(401, f"one-time password for {device_id!r} expired {now - int(expires_at)} s ago; "
                                   "ask for a new one-time password")
            row = self._insert(q, device_id, "device", csr_fingerprint, now, sign())
            q("UPDATE otps SET used_at = ?, csr_fingerprint = ?, serial = ? WHERE digest = ?",
              (now, csr_fingerprint, row.serial, digest))
            return row, False

    def issue(self, device_id: str, csr_fingerprint: str, now: int, sign: Callable[[], x509.Certificate], *,
              kind: str = "device", reuse: bool = True) -> tuple[Row, bool]:
        """Record the certificate `sign()` makes for `device_id`; (row, reused).

        With `reuse`, an unrevoked certificate already issued to this device for the same CSR is
        returned instead (`reused=True`): the answer to a device that retries after a crash.
        """
        with self._transaction() as q:
            if self.dialect.lock_device:
                q(self.dialect.lock_device, (device_id,))
            if reuse:
                found = q(f"SELECT {_ROW_COLUMNS} FROM certs WHERE device_id = ? AND csr_fingerprint = ? "  # noqa: S608
                          "AND revoked_at IS NULL AND not_after > ? ORDER BY issued_at DESC",
                          (device_id, csr_fingerprint, now))
                if found:
                    return self._row(found[0]), True
            return self._insert(q, device_id, kind, csr_fingerprint, now, sign()), False

    def _insert(self, q: Query, device_id: str, kind: str, csr_fingerprint: str, now: int,
                cert: x509.Certificate) -> Row:
        row = Row(serial=serial_hex(cert.serial_number), device_id=device_id, subject=subject_of(cert), kind=kind,
                  not_before=int(cert.not_valid_before_utc.timestamp()),
                  not_after=int(cert.not_valid_after_utc.timestamp()), csr_fingerprint=csr_fingerprint,
                  issued_at=now, revoked_at=None, cert_der=cert.public_bytes(Encoding.DER))
        q(f"INSERT INTO certs ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
          (row.serial, row.device_id, row.subject, row.kind, row.not_before, row.not_after, row.csr_fingerprint,
           row.issued_at, row.revoked_at, row.cert_der))
        return row

    # -- reading and revoking ------------------------------------------------------------------------
    @staticmethod
    def _row(values: tuple[Any, ...]) -> Row:
        serial, device_id, subject, kind, nb, na, fp, issued, revoked, der = values
        return Row(serial, device_id, subject, kind, int(nb), int(na), fp, int(issued),
                   None if revoked is None else int(revoked), bytes(der))

    def _get(self, q: Query, serial: str) -> Row | None:
        found = q(f"SELECT {_ROW_COLUMNS} FROM certs WHERE serial = ?", (serial,))  # noqa: S608
        return self._row(found[0]) if found else None

    def get(self, serial: int | str) -> Row | None:
        with self._transaction(write=False) as q:
            return self._get(q, serial_hex(serial))

    def rows(self, kind: str | None = None) -> list[Row]:
        """Every issued certificate (of `kind`, if given), oldest first."""
        with self._transaction(write=False) as q:
            if kind:
                found = q(f"SELECT {_ROW_COLUMNS} FROM certs WHERE kind = ? ORDER BY issued_at, serial", (kind,))  # noqa: S608
            else:
                found = q(f"SELECT {_ROW_COLUMNS} FROM certs ORDER BY issued_at, serial", ())  # noqa: S608
        return [self._row(r) for r in found]

    def revoke(self, serial: int | str, now: int) -> Row:
        """Mark a certificate revoked; StationError if the serial is unknown or already revoked."""
        key = serial_hex(serial)
        with self._transaction() as q:
            row = self._get(q, key)
            if row is None:
                raise StationError(f"serial {key} is not in the ledger {self!r} (see `tether-station ledger list`)")
            if row.revoked_at is not None:
                raise StationError(f"serial {key} ({row.subject}) is already revoked since {row.revoked_at}")
            q("UPDATE certs SET revoked_at = ? WHERE serial = ?", (now, key))
        return Row(**{**asdict(row), "revoked_at": now})


def device_of(cert: x509.Certificate) -> str:
    """The device id a certificate was issued to (its CN)."""
    return common_name(cert.subject) or ""
