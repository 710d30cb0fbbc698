"""The access token as the rest of the device sees it: in memory for the agent's own consumers (OTA
download, bearer re-enrollment) and in `<state>/token.jwt` (0600) for local applications.

When to ask and how to read a `71,<jwt>` answer is the supervisor's decision (agent/core/supervisor.py
with agent/core/token_schedule.py, shared with the firmware); this class keeps what it adopted.
`adopted` and `status` run on the control loop; `current` and `force_refresh` may be called from any
thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import Config
from hal import storage

log = logging.getLogger(__name__)


class TokenService:
    """The adopted token. `wanted()` (given by the composition root) posts a TokenWanted to the loop:
    a consumer was refused with the current token."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 wanted: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.clock = clock
        self.path = config.state.token
        self._changed = threading.Condition()
        self._token: str | None = None
        self._expires_at = 0.0
        self.refreshes = 0
        self.wanted = wanted

    def adopted(self, token: str, schedule: Any) -> None:
        """The supervisor adopted `token` (a TokenSchedule in `schedule`): persist and publish it."""
        storage.atomic_write(self.path, token.encode() + b"\n", storage.SECRET_MODE)
        with self._changed:
            self._token, self._expires_at = token, float(schedule.expires_at())
            self.refreshes += 1
            self._changed.notify_all()
        now = self.clock()
        log.info("token: received, expires %s, refresh %s", _when(schedule.expires_at(), now),
                 _when(schedule.refresh_at(), now))

    def current(self) -> str | None:
        """The valid token, or None."""
        with self._changed:
            return self._token if self.clock() < self._expires_at else None

    def status(self, refresher: Any) -> dict[str, Any]:
        """For status.json, from the supervisor's TokenRefresher (control loop only)."""
        schedule = refresher.schedule
        error = str(refresher.last_error or "") or None
        if schedule is None:
            return {"present": False, "last_error": error}
        return {"present": self.current() is not None, "expires_at": int(schedule.expires_at()),
                "refresh_at": int(schedule.refresh_at()), "refreshes": self.refreshes, "last_error": error}

    def force_refresh(self, timeout: float = 10.0) -> str | None:
        """Ask for a new token now (an HTTP 401 said ours is no good) and wait for it."""
        with self._changed:
            before = self.refreshes
            self.wanted()
            self._changed.wait_for(lambda: self.refreshes > before, timeout)
        return self.current()


def _when(at: float, now: float) -> str:
    """A moment for a log line people read: `in 5 min (2026-12-07T00:15:00Z)`, never an epoch float."""
    delay = at - now
    ahead = f"in {delay:.0f} s" if abs(delay) < 120 else f"in {delay / 60:.0f} min" if abs(delay) < 7200 \
        else f"in {delay / 3600:.1f} h"
    return f"{ahead} ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(at))})"
