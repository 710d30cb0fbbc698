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
The store (agent/outbox_store.py, with `sqlite3`) is opened only when there is something to queue or
the database already exists (it may hold messages, delivered once a session is up): `tether run`
on a device whose applications never queued anything does not load SQLite at all (issue 24).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.component import Component
from agent.config import Config
from agent.errors import AgentError, OutboxError, OutboxFull

log = logging.getLogger("tether.outbox")
__all__ = ["Outbox", "OutboxError", "OutboxFull", "resolve_topic"]

if TYPE_CHECKING:
    from agent.outbox_store import OutboxStore


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
        self._opening = threading.Lock()  # the socket's threads and the control loop may both open it

    def _open(self) -> OutboxStore | None:
        """The store, opened on first use; None (logged, in the status) while it cannot be opened."""
        with self._opening:
            if self.store is None:
                self._open_store()
        return self.store

    def _open_store(self) -> None:
        from agent.outbox_store import OutboxStore  # loads sqlite3: only once the outbox is used

        box = self.config.outbox
        try:
            self.store = OutboxStore(self.path, max_messages=box.max_messages, max_bytes=box.max_bytes,
                                     policy=box.policy)
        except OutboxError as exc:  # a full disk must not stop the agent: retried on the next publish
            if str(exc) != self.store_error:
                log.error("outbox: %s", exc)
                self.status(outbox={"error": str(exc)})
            self.store_error = str(exc)
            return
        log.info("outbox: %d message(s) queued in %s, delivered oldest first", self.store.count, self.path)

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
        if os.path.exists(self.path):
            return f"outbox: {self.path} is opened once a session is up (queued messages go out oldest first)"
        return "outbox: empty; opened when an application queues a message"

    def on_session_up(self) -> None:
        # A session's message ids restart at 1; acknowledgements still queued from the previous
        # session are dropped by the supervisor (their epoch is not the current one), not here.
        self._online = True
        self._inflight.clear()
        self._last_sent = 0
        self._maybe_more = True
        if self.store is None and os.path.exists(self.path):  # it may hold messages from before
            self._open()
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
