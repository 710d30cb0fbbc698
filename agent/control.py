"""What components hold of the runtime: the control loop's queue (`ControlLoop`) and the live
session (`SessionLink`). Both are made by the composition root (agent/compose.py) before the
components and the runtime, so every piece gets what it needs at construction.

The contract of agent/component.py: the control loop owns all mutable state; the network thread,
component workers and signal handlers only `post` events or `call_soon` functions to it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.component import Component
from agent.errors import AgentError
from agent.session import Session
from agent.state import StatusFile
from hal import TetherError

log = logging.getLogger("tether")
RESTART_EXIT = 75  # EX_TEMPFAIL: "run me again", used after an update switched slots
MAX_SLEEP = 60.0  # the longest the control loop sleeps without an event or a deadline


class Call:
    """A function a worker thread hands to the control loop to run there."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn


class Empty(Exception):
    """`Inbox.get` found nothing within its timeout."""


class Inbox:
    """The control loop's queue: any thread puts, only the loop gets. What it used of `queue.Queue`
    (put; get with a timeout), without what that costs every start-up: `queue` loads `heapq` and two
    C extensions for priority and LIFO queues the agent never uses (issue 24)."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._ready = threading.Condition(threading.Lock())

    def put(self, item: Any) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    def get(self, timeout: float) -> Any:
        """The oldest item; Empty when none arrives within `timeout` seconds."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._items, timeout):
                raise Empty
            return self._items.popleft()


class ControlLoop:
    """The control loop's inbox and its stop flag; any thread may post, only the loop reads."""

    def __init__(self, status_file: StatusFile) -> None:
        self.events = Inbox()
        self.stopping = threading.Event()
        self.status_file = status_file
        self.exit_code = 0

    def post(self, event: Any) -> None:
        """Queue a supervisor event (network thread, signal handler, worker); None only wakes the loop."""
        self.events.put(event)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the control loop: how workers hand back results without sharing state."""
        self.events.put(Call(fn))

    def status(self, **fields: Any) -> None:
        """Merge `fields` into status.json. The control loop is its only writer: other threads post."""
        if self.status_file.owner is not None and threading.current_thread() is not self.status_file.owner:
            self.call_soon(lambda: self.status(**fields))
            return
        try:
            self.status_file.update(**fields)
        except TetherError as exc:  # a full disk must not take the session down
            log.warning("cannot write status: %s", exc)

    def tick(self, components: list[Component], now: float) -> None:
        """Give every component its turn at device time `now` (the loop does this after every event)."""
        for c in components:
            c.tick(now)

    def next(self, components: list[Component], clock: Callable[[], float], also: float | None = None,
             cap: float = MAX_SLEEP) -> Any:
        """The next event, or None once the earliest deadline (the components' `wake_at`, `also`, `cap`
        seconds) has come. A `call_soon` function is run here, on the loop, and gives None too. An idle
        agent sleeps here: no fixed tick. `cap` bounds a wait computed from the device clock, which may
        jump (NTP sets it after boot)."""
        now = clock()
        timeout = cap
        for deadline in [c.wake_at(now) for c in components] + [also]:
            if deadline is not None:
                timeout = min(timeout, deadline - now)
        try:
            item = self.events.get(timeout=max(0.0, timeout))
        except Empty:
            return None
        if isinstance(item, Call):
            item.fn()
            return None
        return item

    def stop(self) -> None:
        self.stopping.set()
        self.events.put(None)  # wake the loop

    def request_restart(self) -> None:
        """Stop cleanly and exit with RESTART_EXIT so the service manager starts the new version
        (systemd `Restart=on-failure`; the demo's supervisor does the same)."""
        log.info("restart requested (an update switched slots): stopping with exit code %d", RESTART_EXIT)
        self.exit_code = RESTART_EXIT
        self.stop()


class SessionLink:
    """The live session, for components that publish (OTA reports, the outbox). The runtime sets it
    when the supervisor says a session is up and clears it when that session ends."""

    def __init__(self) -> None:
        self._session: Session | None = None

    def up(self, session: Session | None) -> None:
        self._session = session

    def down(self) -> None:
        self._session = None

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int | None:
        """Publish on the live session; None when offline (callers with guarantees use the outbox).
        Any thread: paho only queues the message, the session's network thread writes it."""
        session = self._session
        if session is None:
            return None
        return publish_on(session, topic, payload, qos)


def publish_on(session: Session, topic: str, payload: bytes | str, qos: int) -> int | None:
    """`session.publish`, with None when the session is going down (its Disconnected follows)."""
    try:
        return session.publish(topic, payload, qos)
    except AgentError as exc:
        log.info("session: %s", exc)
        return None
