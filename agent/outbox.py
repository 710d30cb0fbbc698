"""Store and forward: the persistent outbox for messages device applications publish.

Contract: a message is on disk before `OutboxStore.append` returns (and before the local API answers
ok); it stays there until the broker acknowledges it (PUBACK for QoS 1, written to the socket for
QoS 0), across dropped sessions, kill -9 and reboots; queued messages go out oldest first, at most
`[outbox] max_inflight` unacknowledged at a time. Delivery is at least once: a PUBACK lost with the
session, or an acknowledgement not yet removed from disk when the agent dies, means the message is
sent again. Payloads are sent unchanged (no envelope), so duplicates are for the receiver to count.

Why SQLite (WAL, synchronous=FULL) rather than an append-only journal: acknowledgements remove
messages out of the middle of the queue (PUBACKs and cap drops), which a journal turns into
tombstones, compaction and a torn-tail recovery we would have to write and test ourselves; SQLite
gives atomic multi-row commits, survives power cuts at any byte (WAL plus FULL fsyncs each commit),
reports a full disk as an error instead of a half-written record, and is in the standard library.
Its cost is one fsync per commit, so writes are grouped: a batch of lines read from the socket is
one transaction, and acknowledgements are removed in batches (losing a removal only re-sends).
`sqlite3` is imported only when `[outbox] enabled` (agent.cli attaches this module lazily).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from agent.component import Component
from agent.config import Config
from agent.errors import AgentError
from hal import storage

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


class OutboxError(AgentError):
    """A message could not be queued (or the store could not be used); the message says why."""


class OutboxFull(OutboxError):
    """The outbox is at its cap and `[outbox] policy = "refuse-new"`."""


def resolve_topic(prefix: str, topic: str) -> str:
    """The broker topic for an application's `topic`: relative to the device's `prefix`, or absolute
    when it starts with "/" (then it must lie under the prefix). Raises OutboxError otherwise.

    The broker's ACL confines a device to `<prefix>/#` and drops anything else without telling the
    publisher (MQTT 3.1.1 has no negative PUBACK), so the mistake is caught here instead.
    """
    if not topic or "\0" in topic:
        raise OutboxError(f"topic {topic!r} is empty or contains NUL")
    if "+" in topic or "#" in topic:
        raise OutboxError(f"topic {topic!r}: wildcards (+, #) are for subscriptions, not publishing")
    if topic.startswith("/"):
        absolute = topic[1:]
        if prefix and absolute != prefix and not absolute.startswith(prefix + "/"):
            raise OutboxError(f"topic {topic!r} is outside this device's prefix {prefix + '/'!r}: the broker "
                              "would drop it silently; use a relative topic or one under the prefix")
    else:
        absolute = f"{prefix}/{topic}" if prefix else topic
    if absolute.startswith("$"):
        raise OutboxError(f"topic {topic!r}: topics starting with $ are reserved for the broker")
    if len(absolute.encode()) > 65535:
        raise OutboxError(f"topic {topic[:40]!r}...: longer than MQTT's 65535 bytes")
    return absolute


class Message(NamedTuple):
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

    def __init__(self, path: Path, *, max_messages: int, max_bytes: int, policy: str) -> None:
        self.path = path
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


class Outbox(Component):
    """The runtime component that drains the store into the live session (agent.component hooks).

    `send(topic, payload, qos)` publishes on the session and returns paho's message id, or None when
    offline; `wake()` makes the control loop call `tick()` soon. Acknowledgements of an earlier
    session never reach `on_acked`: the supervisor drops them by their session epoch.
    """

    name = "outbox"

    FLUSH_EVERY = 200      # acknowledged ids removed per transaction at most...
    FLUSH_AFTER = 0.5      # ...or after this many seconds

    def __init__(self, config: Config, send: Callable[[str, bytes, int], int | None], *,
                 wake: Callable[[], None],
                 status: Callable[..., None] = lambda **_: None) -> None:
        self.config = config
        self.prefix = config.topic_prefix
        self.path = config.state.outbox
        self.send = send
        self.wake = wake
        self.status = status
        self.max_inflight = config.outbox.max_inflight
        self.store: OutboxStore | None = None
        self.store_error = ""
        self._inflight: dict[int, int] = {}   # paho mid -> outbox id, for the current session only
        self._acked: list[int] = []           # delivered, not yet removed from disk
        self._acked_since = 0.0
        self._last_sent = 0
        self._online = False
        self._maybe_more = True  # False once a query found nothing unsent: idle ticks skip SQLite
        self._open()

    def _open(self) -> OutboxStore | None:
        if self.store is None:
            box = self.config.outbox
            try:
                self.store = OutboxStore(self.path, max_messages=box.max_messages, max_bytes=box.max_bytes,
                                         policy=box.policy)
            except OutboxError as exc:  # a full disk must not stop the agent: retried on the next publish
                if str(exc) != self.store_error:
                    log.error("outbox: %s", exc)
                    self.status(outbox={"error": str(exc)})
                self.store_error = str(exc)
        return self.store

    # -- the publish API (any thread) ------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int:
        """Queue one message durably and return its outbox id. Raises OutboxError (bad topic or
        QoS, outbox full under refuse-new, disk full)."""
        (result,) = self.publish_many([(topic, payload, qos)])
        if isinstance(result, OutboxError):
            raise result
        return result

    def publish_many(self, items: Sequence[tuple[str, bytes | str, int]]) -> list[int | OutboxError]:
        """Queue several messages with one fsync; per item its id or the error that refused it."""
        results: list[int | OutboxError | None] = []
        accepted: list[tuple[str, bytes, int]] = []
        for topic, payload, qos in items:
            try:
                if qos not in (0, 1):
                    raise OutboxError(f"qos {qos!r}: the outbox delivers QoS 0 and 1 (at least once), not 2")
                accepted.append((resolve_topic(self.prefix, topic),
                                 payload.encode() if isinstance(payload, str) else bytes(payload), qos))
                results.append(None)
            except OutboxError as exc:
                results.append(exc)
        store = self._open()
        if store is None:
            raise OutboxError(f"the outbox is unavailable: {self.store_error}")
        stored = iter(store.append(accepted) if accepted else [])
        self._maybe_more = True
        if self.store_error:
            self.store_error = ""
            self.status(outbox={"error": None})
        self.wake()
        return [next(stored) if r is None else r for r in results]

    # -- runtime hooks (control loop thread) -----------------------------------------------------------
    def on_boot(self) -> str:
        if self.store is None:
            return f"outbox: unavailable for now ({self.store_error})"
        return f"outbox: {self.store.count} message(s) queued in {self.path}, delivered oldest first"

    def on_session_up(self) -> None:
        # A session's message ids restart at 1; acknowledgements still queued from the previous
        # session are dropped by the supervisor (their epoch is not the current one), not here.
        self._online = True
        self._inflight.clear()
        self._last_sent = 0
        self._maybe_more = True
        self._pump()

    def on_session_down(self) -> None:
        self._online = False
        if self._inflight:
            log.info("outbox: %d message(s) in flight without an acknowledgement; they go again on the next "
                     "session (the broker may see them twice)", len(self._inflight))
        self._inflight.clear()  # unacknowledged messages go again, from the oldest, on the next session
        self._last_sent = 0
        self._maybe_more = True
        self._flush()

    def on_acked(self, mid: int) -> None:
        outbox_id = self._inflight.pop(mid, None)
        if outbox_id is not None:
            if not self._acked:
                self._acked_since = time.monotonic()
            self._acked.append(outbox_id)
            if len(self._acked) >= self.FLUSH_EVERY:
                self._flush()
            self._pump()

    def wake_at(self, now: float) -> float | None:
        # acknowledged messages are deleted in batches: by FLUSH_EVERY of them, or FLUSH_AFTER seconds
        if not self._acked:
            return None
        return now + max(0.0, self._acked_since + self.FLUSH_AFTER - time.monotonic())

    def tick(self, now: float) -> None:
        if self._acked and time.monotonic() - self._acked_since >= self.FLUSH_AFTER:
            self._flush()
        self._pump()

    # -- internals -------------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Fill the in-flight window from the oldest message not yet sent in this session."""
        store = self.store
        if store is None or not self._online or not self._maybe_more:
            return
        acked = set(self._acked)
        while len(self._inflight) < self.max_inflight:
            self._maybe_more = False  # cleared before the query: a commit racing it sets it again
            batch = store.after(self._last_sent, self.max_inflight - len(self._inflight))
            if not batch:
                return
            for message in batch:
                self._last_sent = message.id
                if message.id in acked:
                    continue
                try:
                    mid = self.send(message.topic, message.payload, message.qos)
                except AgentError as exc:  # the session is going down; its event follows
                    log.info("outbox: holding messages: %s", exc)
                    mid = None
                if mid is None:
                    self._online = False
                    self._last_sent = 0
                    return
                self._inflight[mid] = message.id
            self._maybe_more = True

    def _flush(self) -> None:
        if not self._acked or self.store is None:
            return
        try:
            self.store.remove(self._acked)
        except OutboxError as exc:  # they stay queued and go again later: duplicates, not losses
            log.warning("outbox: %s; they will be sent again", exc)
            if len(self._acked) < 10 * self.FLUSH_EVERY:
                return
        self._acked = []

    def stats(self) -> dict[str, Any]:
        store = self.store
        return {"queued": store.count if store else None, "bytes": store.bytes if store else None,
                "dropped": store.dropped if store else 0, "inflight": len(self._inflight)}
