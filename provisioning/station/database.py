"""The station's database plumbing: connections, transactions, group commit and the schema.

SQLite (WAL) by default; PostgreSQL (psycopg 3) when several stations share one factory. The same SQL
runs on both; the few differences sit in `Dialect`. Connections are pooled (one per concurrent request,
reused), never shared between threads at the same time, and opened lazily so a pre-forking server
opens them after the fork.

On SQLite the writes of the request path go through a group commit (`groupcommit.py`): requests that
arrive while another commit is under way share the next transaction, each in its own savepoint, so one
fsync covers several issuances and nothing is returned before the COMMIT holding it. PostgreSQL groups
commits by itself (`commit_delay`).

Every table lives in one schema (`schema.py`): its parts (the issuance ledger, attestation, refusal
records, the console) are created and migrated here when the database is opened, never by the modules
that use them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from provisioning.station.errors import Refusal, StationError
from provisioning.station.groupcommit import GroupCommit, Slot

SYNC_MODES = ("full", "normal")
COMMIT_AVERAGE = 0.2  # weight of the newest COMMIT in `Database.commit_seconds`

Query = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


class WriterBusy(Exception):
    """Another writer holds the ledger's write lock (`Database.write_now` does not wait for it)."""


@dataclass(frozen=True)
class Dialect:
    placeholder: str
    blob: str
    serial_pk: str             # an auto-numbered primary key column
    begin: str | None          # statement that opens a write transaction (None: driver does it)
    for_update: str            # row lock suffix for SELECT
    lock_device: str | None    # serialises requests for one device (same CSR twice at once)


SQLITE = Dialect("?", "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT", "BEGIN IMMEDIATE", "", None)
POSTGRES = Dialect("%s", "BYTEA", "BIGSERIAL PRIMARY KEY", None, " FOR UPDATE",
                   "SELECT pg_advisory_xact_lock(hashtext(%s))")


@dataclass(frozen=True)
class SchemaPart:
    """The tables one concern keeps in the database, and how an older database is brought up to date.

    `tables`: `;`-separated CREATE ... IF NOT EXISTS statements (`{blob}` and `{serial_pk}` filled in
    by the dialect); `added`: (table, column, type) added after a first release, added when missing
    (ALTER TABLE ... ADD COLUMN works alike in SQLite and PostgreSQL); `after`: statements that need
    those columns (indexes); `migrate(q, existed)`: data migrations, given the tables that existed
    before this open. All of it runs in the transaction that opens the database.
    """

    name: str
    tables: str
    added: tuple[tuple[str, str, str], ...] = ()
    after: str = ""
    migrate: Callable[[Query, frozenset[str]], None] | None = None


class Database:
    """The database at `location` (a `postgresql://` URL, `sqlite:///path`, or a plain file path),
    with `parts` created and migrated when it is opened."""

    def __init__(self, location: str, sync: str, parts: Sequence[SchemaPart]) -> None:
        if sync not in SYNC_MODES:
            raise StationError(f"ledger sync mode {sync!r}: expected one of {', '.join(SYNC_MODES)}")
        self.sync = sync
        self.location = location
        self.is_postgres = location.startswith(("postgresql://", "postgres://"))
        self.dialect = POSTGRES if self.is_postgres else SQLITE
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = threading.Lock()
        self._lock_fd: int | None = None
        self.group: GroupCommit[Query] = GroupCommit(self.transaction, self._savepoint)
        # how long a write COMMIT (its fsync) takes here, a moving average: the worker's loop commits
        # its own writes only while it is short (compute.INLINE_COMMIT)
        self.commit_seconds = 0.0
        self._open(parts)

    def __repr__(self) -> str:
        return self.location.split("@")[-1] if self.is_postgres else self.location  # no password in logs

    # -- the schema ----------------------------------------------------------------------------------
    def _open(self, parts: Sequence[SchemaPart]) -> None:
        with self.transaction() as q:
            existed = frozenset(self.tables(q))
            for part in parts:
                self._apply(q, part, existed)

    def _apply(self, q: Query, part: SchemaPart, existed: frozenset[str]) -> None:
        for statement in _statements(part.tables.format(blob=self.dialect.blob, serial_pk=self.dialect.serial_pk)):
            q(statement, ())
        present: dict[str, set[str]] = {}
        for table, column, kind in part.added:
            if column not in present.setdefault(table, self.columns(q, table)):
                q(f"ALTER TABLE {table} ADD COLUMN {column} {kind}", ())
        for statement in _statements(part.after):
            q(statement, ())
        if part.migrate is not None:
            part.migrate(q, existed)

    def tables(self, q: Query) -> set[str]:
        """The names of the tables in the database, inside the transaction `q`."""
        if self.is_postgres:
            found = q("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()", ())
        else:
            found = q("SELECT name FROM sqlite_master WHERE type = 'table'", ())
        return {str(r[0]) for r in found}

    def columns(self, q: Query, table: str) -> set[str]:
        """The column names of `table` (a constant, never input), inside the transaction `q`."""
        if self.is_postgres:
            found = q("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                      "AND table_name = ?", (table,))
            return {str(r[0]) for r in found}
        return {str(r[1]) for r in q(f"PRAGMA table_info({table})", ())}

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
                raise StationError(f"Ledger({self!r}): cannot connect to PostgreSQL: {exc}") from exc
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
    def connection(self) -> Iterator[Any]:
        """A pooled DB-API connection (autocommit), back to the pool when the block ends cleanly."""
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        ok = False
        try:
            yield conn
            ok = True
        except (Refusal, WriterBusy):
            ok = True  # refused inside a rolled-back transaction, or none begun: the connection is clean
            raise
        finally:
            if ok:
                self._pool.put(conn)
            else:  # a connection that saw an error may be mid-transaction: drop it
                with contextlib.suppress(Exception):
                    conn.close()

    @contextlib.contextmanager
    def transaction(self, write: bool = True, wait: bool = True) -> Iterator[Query]:
        """One transaction; yields `q(sql, params) -> rows` (`?` placeholders on both databases);
        commits when the block ends, rolls back on any exception.

        SQLite: a write transaction takes the database's write lock up front (BEGIN IMMEDIATE), so two
        requests cannot both read "OTP unused" and both issue; reads take no lock (WAL readers). With
        `wait=False` it raises WriterBusy, before any statement, when another writer holds that lock.
        """
        with self.connection() as conn:
            def q(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                if self.is_postgres:
                    sql = sql.replace("?", "%s")
                cur = conn.execute(sql, tuple(params))
                return list(cur.fetchall()) if cur.description else []

            if self.is_postgres:
                with conn.transaction():
                    yield q
                return
            with self._sqlite_writer(wait) if write else contextlib.nullcontext():
                conn.execute(self.dialect.begin if write else "BEGIN")
                try:
                    yield q
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                started = time.monotonic()
                conn.execute("COMMIT")
                if write:
                    self.commit_seconds += (time.monotonic() - started - self.commit_seconds) * COMMIT_AVERAGE

    @contextlib.contextmanager
    def _sqlite_writer(self, wait: bool = True) -> Iterator[None]:
        """Queue SQLite writers on a lock, in this process and across the station's worker processes.

        SQLite's own busy handler polls with sleeps of up to 100 ms, which under load turns into idle
        CPUs and a long latency tail; a thread lock plus flock() on `<db>.lock` wakes the next writer
        the moment the previous one commits. Writers that skip it are still safe (SQLite's lock).
        """
        if not self._writer.acquire(blocking=wait):
            raise WriterBusy
        try:
            if self._lock_fd is None:
                path = self.location.removeprefix("sqlite://") + ".lock"
                self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WriterBusy from None
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._writer.release()

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

    def write(self, work: Callable[[Query], Any]) -> Any:
        """Run `work(q)` in a write transaction of the request path and return its result once that
        transaction is committed: SQLite shares the transaction (and its fsync) with concurrent
        requests (group commit); PostgreSQL runs one transaction per call."""
        if self.is_postgres:
            with self.transaction() as q:
                return work(q)
        return self.group.run(work)

    def write_now(self, work: Callable[[Query], Any]) -> tuple[bool, Any]:
        """(True, what `work(q)` returned) after running it in a transaction of its own and committing
        it, when the write lock was free at once; (False, None) without running it when another writer
        (a commit thread, another worker) holds it, or on PostgreSQL. Raises what `work` or the COMMIT
        raised, as `write` does."""
        if self.is_postgres:
            return False, None
        try:
            with self.transaction(wait=False) as q:
                value = work(q)
        except WriterBusy:
            return False, None
        return True, value

    def write_batch(self, batch: list[Slot]) -> None:
        """Run the works of `batch`, gathered by one thread (`committer.Committer`), as `write` would run
        them from as many threads: on SQLite in one transaction, each in its savepoint, one COMMIT (one
        fsync); on PostgreSQL one transaction each. Each slot then holds its value or its error."""
        if not self.is_postgres:
            self.group.commit(batch)
            return
        for slot in batch:
            try:
                slot.value = self.write(slot.work)
            except Exception as exc:  # noqa: BLE001 - handed to the request it belongs to
                slot.error = exc
            slot.done = True

    def select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """One SELECT on its own (autocommit: the statement is its own read transaction), without the
        BEGIN and COMMIT round trips of `transaction`; for lookups made on every request."""
        with self.connection() as conn:
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


def _statements(text: str) -> list[str]:
    return [s for s in text.split(";") if s.strip()]
