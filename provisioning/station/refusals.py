"""How refused EST requests reach the ledger's `est_events` table (`schema.REFUSALS`): bounded per
address, summarised, and pruned. A refusal is a ledger record, written here by the EST server and
read by the console's live page (the `certs` row is the record of an issuance). The window bookkeeping
takes the clock it is given.

Every refusal used to be one synced INSERT, so anyone who can open a TLS connection could write to
the ledger as fast as the disk allows (1,254 rows/s from one host, issue 22 item 6) until the disk,
and the issuance record with it, failed. Now each client address (an IPv6 client's /64) opens a
window of `window` seconds at its first refusal; the first `per_address` refusals in it are written
one by one, the rest only counted, and when the window closes each status refused more often than
that gets one summary row (`refusals` = how many it stands for, the first reason as a sample). At
most `max_addresses` windows are open at once; refusals from further addresses share one window
under the address `*`. So one worker writes at most (max_addresses + 1) x (per_address + statuses)
rows per window, whatever it is sent.

Retention: rows older than `max_age` seconds go, and only the newest `max_rows` stay. Pruning deletes
`PRUNE_BATCH` rows per transaction from a background thread, so an enrollment waits for one short
delete at most, never for the whole sweep. Each worker process has its own recorder; with W workers
the bounds above are per worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509

from provisioning.certs import common_name
from provisioning.station.ratelimit import address_key

if TYPE_CHECKING:
    from provisioning.station.enrollment import Request

log = logging.getLogger("tether.station")

MAX_ADDRESSES = 1024
OTHERS = "*"             # the address of the window shared by addresses beyond MAX_ADDRESSES
PRUNE_BATCH = 500        # rows deleted per transaction
PRUNE_EVERY = 60.0       # seconds between retention sweeps
MAX_SAMPLE_IDS = 5       # device ids named in a summary row
MAX_COUNTED_IDS = 1000   # further distinct device ids counted per summary (then "1000+")
MAX_REASON = 500         # characters of a refusal's reason kept in its row


def device_of_request(req: Request) -> str:
    """Who a refused request claimed to be: the HTTP Basic user, else the client certificate's CN."""
    if req.basic is not None and req.basic[0]:
        return req.basic[0]
    if req.peer_der is not None:
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
        with ledger.db.transaction() as q:
            q("INSERT INTO est_events (at, operation, device_id, status, reason, address, refusals) "
              "VALUES (?, ?, ?, ?, ?, ?, ?)",
              (at, operation, device_id[:200], status, reason[:MAX_REASON], address, refusals))
    except Exception:  # the device's answer matters more than the console's record
        log.exception("could not record the refusal of %r in the ledger", device_id[:200])


@dataclass
class _Tally:
    """Refusals of one status from one address that were counted, not written."""

    operation: str
    first_reason: str
    count: int = 0
    last_at: float = 0.0
    device_ids: list[str] = field(default_factory=list)
    more_ids: set[str] = field(default_factory=set)

    def add(self, at: float, device_id: str) -> None:
        self.count += 1
        self.last_at = at
        if device_id in self.device_ids:
            return
        if len(self.device_ids) < MAX_SAMPLE_IDS:
            self.device_ids.append(device_id)
        elif len(self.more_ids) < MAX_COUNTED_IDS:
            self.more_ids.add(device_id)

    def named(self) -> str:
        more = len(self.more_ids)
        if not more:
            return ", ".join(self.device_ids)
        return ", ".join(self.device_ids) + f" and {more}{'+' if more >= MAX_COUNTED_IDS else ''} more"


@dataclass
class _Window:
    start: float
    written: int = 0
    tallies: dict[int, _Tally] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """One summary row: `count` refusals with `status` from `address` not written one by one."""

    at: int
    address: str
    status: int
    operation: str
    device_id: str
    count: int
    reason: str


class RefusalRecorder:
    """Records refusals for one worker process; thread-safe. `record` never raises."""

    def __init__(self, ledger: Any, *, per_address: int, window: float, max_age: int, max_rows: int,
                 clock: Callable[[], float] = time.time, max_addresses: int = MAX_ADDRESSES) -> None:
        if per_address < 1 or window <= 0 or max_age < 1 or max_rows < 1 or max_addresses < 1:
            raise ValueError(f"refusal records: per_address {per_address}, window {window}, max_age {max_age}, "
                             f"max_rows {max_rows} and max_addresses {max_addresses} must all be positive")
        self.ledger = ledger
        self.per_address = per_address
        self.window = window
        self.max_age = max_age
        self.max_rows = max_rows
        self.max_addresses = max_addresses
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a window opened: the thread recomputes when to wake
        self._thread: threading.Thread | None = None

    # -- recording -----------------------------------------------------------------------------------
    def record(self, operation: str, device_id: str, status: int, reason: str, address: str) -> None:
        """One refused request from `address`: written now, or counted for its window's summary."""
        now = self.clock()
        key = address_key(address) if address else "?"
        with self._lock:
            due = self._close(now)
            window = self._windows.get(key)
            if window is None and len(self._windows) >= self.max_addresses:
                key = OTHERS
                window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(now)
                self._wake.set()
            write = window.written < self.per_address
            if write:
                window.written += 1
            else:
                tally = window.tallies.get(status)
                if tally is None:
                    tally = window.tallies[status] = _Tally(operation, reason)
                tally.add(now, device_id)
        self._write_summaries(due)
        if write:
            record_refusal(self.ledger, int(now), operation, device_id, status, reason, address)

    def flush(self, everything: bool = False) -> list[Summary]:
        """Write the summaries of windows that have closed (all open windows with `everything`, when
        the worker stops); returns what was written."""
        with self._lock:
            due = self._close(float("inf") if everything else self.clock())
        self._write_summaries(due)
        return due

    def _close(self, now: float) -> list[Summary]:
        """Remove windows that ended by `now`; their summaries (caller holds the lock)."""
        ended = [k for k, w in self._windows.items() if w.start + self.window <= now]
        out = []
        for key in ended:
            window = self._windows.pop(key)
            for status, t in sorted(window.tallies.items()):
                reason = (f"{t.count} more refusals ({status}) from {key} within {self.window:g} s of "
                          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(window.start))}, not recorded one "
                          f"by one; device ids: {t.named()}; the first said: {t.first_reason}")
                device_id = t.device_ids[0] if len(t.device_ids) == 1 and not t.more_ids else "*"
                out.append(Summary(int(t.last_at), key, status, t.operation, device_id, t.count, reason))
        return out

    def _write_summaries(self, due: list[Summary]) -> None:
        for s in due:
            record_refusal(self.ledger, s.at, s.operation, s.device_id, s.status, s.reason, s.address,
                                  refusals=s.count)

    def next_close(self) -> float | None:
        """When the earliest open window closes (clock time), or None."""
        with self._lock:
            return min((w.start + self.window for w in self._windows.values()), default=None)

    # -- retention -----------------------------------------------------------------------------------
    def prune(self) -> int:
        """Delete rows older than `max_age` and beyond the newest `max_rows`, `PRUNE_BATCH` rows per
        transaction; the number deleted. Raises what the ledger raises."""
        deleted = 0
        oldest = int(self.clock()) - self.max_age
        while True:
            n = self._delete("SELECT id FROM est_events WHERE at < ? ORDER BY at, id LIMIT ?", (oldest, PRUNE_BATCH))
            deleted += n
            if n < PRUNE_BATCH:
                break
        with self.ledger.db.transaction(write=False) as q:
            found = q("SELECT id FROM est_events ORDER BY id DESC LIMIT 1 OFFSET ?", (self.max_rows,))
        if found:
            while True:
                n = self._delete("SELECT id FROM est_events WHERE id <= ? ORDER BY id LIMIT ?",
                                 (int(found[0][0]), PRUNE_BATCH))
                deleted += n
                if n < PRUNE_BATCH:
                    break
        return deleted

    def _delete(self, select: str, params: tuple[int, int]) -> int:
        with self.ledger.db.transaction() as q:
            ids = [int(r[0]) for r in q(select, params)]
            if ids:
                q(f"DELETE FROM est_events WHERE id IN ({', '.join('?' * len(ids))})", ids)  # noqa: S608 - placeholders only
        return len(ids)

    # -- the worker's background thread --------------------------------------------------------------
    def start(self) -> None:
        """Prune now and every PRUNE_EVERY seconds, and write summaries as their windows close, from a
        daemon thread (start it in the worker process, after the fork)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="refusal-records", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write the summaries of the windows still open."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush(everything=True)

    def _run(self) -> None:
        next_prune = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            try:
                self.flush()
                if now >= next_prune:
                    deleted = self.prune()
                    next_prune = now + PRUNE_EVERY
                    if deleted:
                        log.info("deleted %d refusal records beyond the retention (%d s, %d rows)", deleted,
                                 self.max_age, self.max_rows)
            except Exception:  # the ledger is down: the next turn tries again; issuance is not affected
                log.exception("refusal records: summary or retention sweep failed")
                next_prune = now + PRUNE_EVERY
            close = self.next_close()
            wake = next_prune if close is None else min(close, next_prune)
            self._wake.wait(max(0.05, wake - self.clock()))
            self._wake.clear()
