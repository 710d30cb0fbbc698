"""The access token: fetched over MQTT (Cumulocity `s/uat` -> `s/dat` `71,<jwt>`), refreshed at half
its lifetime, kept in memory and in `<state>/token.jwt` (0600) for local applications.

When to ask is decided by `agent.core.token_schedule.TokenRefresher` (pure, shared with the
firmware); this class only does the I/O: subscribe, publish, persist, log.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.core.backoff import Backoff
from agent.core.errors import CoreError
from agent.core.smartrest import parse_token, split_lines, template_id
from agent.core.token_schedule import TokenRefresher
from agent.core.topics import Topics
from hal import storage

log = logging.getLogger(__name__)
TOKEN_FILE = "token.jwt"  # noqa: S105 (a file name, not a secret)

Publish = Callable[[str, bytes, int], Any]


class TokenService:
    """Token cycle for one device. Thread-safe: the runtime's loop drives it, other threads read it."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random) -> None:
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self.request_topic = self._topic(config.token.request_topic)
        self.response_topic = self._topic(config.token.response_topic)
        self.clock = clock
        self.rand = rand
        self.refresher = TokenRefresher(Backoff(config.mqtt.backoff_base, config.mqtt.backoff_cap),
                                        config.token.timeout)
        self.path = Path(config.state_dir) / TOKEN_FILE
        self._publish: Publish | None = None
        self._changed = threading.Condition()
        self._forced = False
        self.refreshes = 0
        self.wake: Callable[[], None] = lambda: None  # set by the runtime to interrupt its wait

    def _topic(self, name: str) -> str:
        prefix = self.config.topic_prefix
        return f"{prefix}/{name}" if prefix else name

    # -- driven by the runtime loop ----------------------------------------------------------------
    def on_session_up(self, subscribe: Callable[[str, int], Any], publish: Publish) -> None:
        """A new session: subscribe to the response topic and ask at once if no valid token is held."""
        subscribe(self.response_topic, 1)
        self._publish = publish
        self.refresher.restart()

    def on_session_down(self) -> None:
        self._publish = None
        self.refresher.restart()

    def next_event_at(self) -> float:
        return 0.0 if self._forced else float(self.refresher.next_event_at())

    def tick(self) -> None:
        """Send a request when due; count a timed-out one as a failure (retry with backoff)."""
        now = self.clock()
        if self.refresher.timed_out(now, self.rand()):
            log.warning("token: %s; retrying at %.0f (keeping the current token while valid)",
                        self.refresher.last_error, self.refresher.next_event_at())
        forced = self._forced and not self.refresher.pending()
        if self._publish is not None and (forced or self.refresher.due(now)):
            self._forced = False
            self._publish(self.request_topic, b"", 1)
            self.refresher.requested(now)
            log.debug("token: requested on %s", self.request_topic)

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Handle a message if it is on the response topic; True when it was ours."""
        if topic != self.response_topic:
            return False
        now = self.clock()
        try:
            lines = split_lines(payload)
        except CoreError as exc:
            log.warning("token: ignoring response: %s", exc)
            return True
        for line in lines:
            if template_id(line) != "71":
                continue  # other SmartREST lines on s/dat are not ours
            try:
                token = parse_token(line)
                schedule = self.refresher.received(token, now, self.rand())
            except CoreError as exc:
                if not self.refresher.last_error:
                    self.refresher.rejected(exc, now, self.rand())
                log.warning("token: rejected a 71 line: %s; keeping the previous token, asking again at %.0f",
                            exc, self.refresher.next_event_at())
                continue
            storage.atomic_write(self.path, token.encode() + b"\n", storage.SECRET_MODE)
            self.refreshes += 1
            log.info("token: received, expires at %.0f, refresh at %.0f", schedule.expires_at(),
                     schedule.refresh_at())
            with self._changed:
                self._changed.notify_all()
        return True

    # -- for consumers -----------------------------------------------------------------------------
    def current(self) -> str | None:
        """The valid token, or None."""
        return self.refresher.token(self.clock())  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        schedule = self.refresher.schedule
        if schedule is None:
            return {"present": False, "last_error": str(self.refresher.last_error or "") or None}
        return {"present": self.current() is not None, "expires_at": int(schedule.expires_at()),
                "refresh_at": int(schedule.refresh_at()), "refreshes": self.refreshes,
                "last_error": str(self.refresher.last_error or "") or None}

    def force_refresh(self, timeout: float = 10.0) -> str | None:
        """Ask for a new token now (an HTTP 401 said ours is no good) and wait for it."""
        with self._changed:
            before = self.refreshes
            self._forced = True
            self.wake()
            self._changed.wait_for(lambda: self.refreshes > before, timeout)
        return self.current()
