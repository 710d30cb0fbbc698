"""The outbox's queue on disk: SQLite in WAL mode with synchronous=FULL (agent/outbox.py says why).

A module of its own so that `sqlite3` (its C library and the module) loads only when the outbox has
something in it or something to queue: `Outbox` imports this module on demand, and a device whose
applications have queued nothing starts without SQLite (issue 24).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from agent.errors import OutboxError, OutboxFull
from hal import storage
from hal.value import Value

log = logging.getLogger("tether.outbox")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused, so id order is queue order
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    size INTEGER NOT NULL,
    queued_at REAL NOT NULL
);
"""


class Message(Value):
    id: int
    topic: str
    payload: bytes
    qos: int


def _describe(exc: sqlite3.Error | OSError, path: Path) -> str:
    full = (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)) or \
        (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
    hint = " (disk full, ENOSPC: free space in the state directory)" if full else ""
    return f"{path}: {exc}{hint}"


def _corrupt(exc: sqlite3.DatabaseError) -> bool:
    """SQLite says the file is not a database or is malformed (not: busy, full, read-only)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)  # primary code


class OutboxStore:
    """The queue on disk (SQLite). Thread-safe: the socket threads append, the control loop reads."""

    def __init__(self, path: str | os.PathLike[str], *, max_messages: int, max_bytes: int, policy: str) -> None:
        self.path = path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.policy = policy
        self.dropped = 0  # messages dropped by the cap since start
        self._lock = threading.Lock()
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if _corrupt(exc):  # not a database, or a malformed one: keep it for a post-mortem, start empty
                if getattr(self, "_db", None) is not None:
                    self._db.close()

                for suffix in ("-wal", "-shm", ""):  # the database last: its -wal belongs with it
                    storage.set_aside(Path(f"{path}{suffix}"), str(exc), "starting with an empty outbox")
                try:
                    self._open()
                except (sqlite3.Error, OSError) as again:
                    raise OutboxError(f"cannot open the outbox: {_describe(again, path)}") from again
            else:
                raise OutboxError(f"cannot open the outbox: {_describe(exc, path)}") from exc
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open the outbox: {_describe(exc, path)}") from exc

    def _open(self) -> None:
        path = self.path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # before first boot made it
        # the file exists with mode 0600 before SQLite writes a byte (its -wal/-shm copy the mode)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the API says ok
        self._db.executescript(_SCHEMA)
        self.count, self.bytes = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()

    def append(self, items: Sequence[tuple[str, bytes, int]]) -> list[int | OutboxError]:
        """Queue `items` (broker topic, payload, qos) in one durable transaction.

        Returns, per item, its id or the OutboxError that refused it (too large, or full under
        refuse-new). Raises OutboxError when the store itself fails (disk full): then nothing of
        the batch was queued and the store is as it was.
        """
        results: list[int | OutboxError] = []
        dropped: list[int] = []
        with self._lock:
            count, size = self.count, self.bytes
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for topic, payload, qos in items:
                    need = len(topic.encode()) + len(payload)
                    if need > self.max_bytes:
                        results.append(OutboxError(f"message of {need} bytes exceeds [outbox] max_bytes = "
                                                   f"{self.max_bytes}"))
                        continue
                    if count + 1 > self.max_messages or size + need > self.max_bytes:
                        if self.policy == "refuse-new":
                            results.append(OutboxFull(
                                f"outbox full ({count} messages, {size} bytes; [outbox] max_messages = "
                                f"{self.max_messages}, max_bytes = {self.max_bytes}) and policy is refuse-new: "
                                "try again once the device is back online"))
                            continue
                        while count and (count + 1 > self.max_messages or size + need > self.max_bytes):
                            old_id, old_size = self._db.execute(
                                "SELECT id, size FROM outbox ORDER BY id LIMIT 1").fetchone()
                            self._db.execute("DELETE FROM outbox WHERE id = ?", (old_id,))
                            dropped.append(old_id)
                            count, size = count - 1, size - old_size
                    cur = self._db.execute("INSERT INTO outbox (topic, payload, qos, size, queued_at) "
                                           "VALUES (?, ?, ?, ?, ?)", (topic, payload, qos, need, time.time()))
                    results.append(int(cur.lastrowid or 0))
                    count, size = count + 1, size + need
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"cannot queue {len(items)} message(s): {_describe(exc, self.path)}; nothing of "
                                  "this batch was queued") from exc
            self.count, self.bytes = count, size
            self.dropped += len(dropped)
        if dropped:
            log.warning("outbox: full ([outbox] max_messages = %d, max_bytes = %d): dropped %d oldest message(s) "
                        "(ids %d..%d) to queue new ones (policy drop-oldest)", self.max_messages, self.max_bytes,
                        len(dropped), dropped[0], dropped[-1])
        return results

    def after(self, last_id: int, limit: int) -> list[Message]:
        """Up to `limit` queued messages with id > `last_id`, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, qos FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                    (last_id, limit)).fetchall()
        return [Message(int(i), t, bytes(p), int(q)) for i, t, p, q in rows]

    def remove(self, ids: Sequence[int]) -> None:
        """Forget acknowledged messages. Raises OutboxError (the messages stay queued) on failure."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for start in range(0, len(ids), 500):  # old SQLite builds allow 999 parameters
                    chunk = list(ids[start:start + 500])
                    marks = ",".join("?" * len(chunk))
                    self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)  # noqa: S608 (only ?s)
                self._db.execute("COMMIT")
                self.count, self.bytes = self._db.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
            except sqlite3.Error as exc:
                self._rollback()
                self.count, self.bytes = self._db.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
                raise OutboxError(f"cannot remove {len(ids)} delivered message(s): "
                                  f"{_describe(exc, self.path)}") from exc

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:  # no transaction left to roll back (SQLite undid it itself)
            log.debug("outbox: rollback: %s", exc)

    def close(self) -> None:
        with self._lock:
            self._db.close()
