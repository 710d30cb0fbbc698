"""Enrollment refusals, recorded for the console's live page (the ledger already holds every issuance).

Kept apart from the console's web code so the EST server can call `record_refusal` without importing
Jinja2 or segno. A refusal is one short INSERT; an issuance writes nothing here (the `certs` row is the
event), so the enrollment path stays as fast as before. How many refusals are written one by one, the
summary rows that stand for the rest (`refusals` > 1) and the table's retention are decided by
`provisioning.station.refusals`.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provisioning.station.enrollment import Request

log = logging.getLogger("tether.station")

MAX_REASON = 500

_SQLITE_TABLE = """CREATE TABLE IF NOT EXISTS est_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at BIGINT NOT NULL, operation TEXT NOT NULL, device_id TEXT NOT NULL,
    status INTEGER NOT NULL, reason TEXT NOT NULL, address TEXT NOT NULL, refusals INTEGER NOT NULL DEFAULT 1)"""
_POSTGRES_TABLE = _SQLITE_TABLE.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
# ledgers whose table is known to exist (a cache that saves one statement per refusal, nothing more)
_READY: weakref.WeakSet[Any] = weakref.WeakSet()


def ensure_table(ledger: Any) -> None:
    """Create the `est_events` table in `ledger` (SQLite or PostgreSQL) if it is missing."""
    if ledger in _READY:
        return
    with ledger._transaction() as q:
        q(_POSTGRES_TABLE if ledger.is_postgres else _SQLITE_TABLE, ())
        q("CREATE INDEX IF NOT EXISTS est_events_by_time ON est_events (at)", ())
        # how many refusals the row stands for (a summary row, > 1); tables from before it gain it here
        if "refusals" not in _columns(q, ledger.is_postgres):
            q("ALTER TABLE est_events ADD COLUMN refusals INTEGER NOT NULL DEFAULT 1", ())
    _READY.add(ledger)


def _columns(q: Any, postgres: bool) -> set[str]:
    if postgres:
        found = q("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                  "AND table_name = 'est_events'", ())
        return {str(r[0]) for r in found}
    return {str(r[1]) for r in q("PRAGMA table_info(est_events)", ())}


def device_of_request(req: Request) -> str:
    """Who a refused request claimed to be: the HTTP Basic user, else the client certificate's CN."""
    if req.basic is not None and req.basic[0]:
        return req.basic[0]
    if req.peer_der is not None:
        from cryptography import x509

        from provisioning.certs import common_name

        try:
            return common_name(x509.load_der_x509_certificate(req.peer_der).subject) or "?"
        except ValueError:
            return "?"
    return "?"


def record_refusal(ledger: Any, at: int, operation: str, device_id: str, status: int, reason: str,
                   address: str, refusals: int = 1) -> None:
    """Write one refused EST request (or, with `refusals` > 1, a row standing for that many). Never
    raises: a refusal must reach the device even when the ledger cannot take the record (logged)."""
    try:
        ensure_table(ledger)
        with ledger._transaction() as q:
            q("INSERT INTO est_events (at, operation, device_id, status, reason, address, refusals) "
              "VALUES (?, ?, ?, ?, ?, ?, ?)",
              (at, operation, device_id[:200], status, reason[:MAX_REASON], address, refusals))
    except Exception:  # the device's answer matters more than the console's record
        log.exception("could not record the refusal of %r in the ledger", device_id[:200])
        _READY.discard(ledger)
