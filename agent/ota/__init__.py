"""Over-the-air updates: signed release, resumable download into the inactive slot, switch, commit or roll back.

Importing this package is cheap on purpose: `tether run` imports it at start for `LazyOta`, the
updater as a runtime component that costs nothing until there is OTA work. The updater
(`agent.ota.agent.OtaAgent`, which agent/compose.py wraps in a LazyOta), its state machine and its
HTTP client are imported only when a `515` operation arrives or when an earlier update left state
behind (`<state_dir>/ota/state.json`: an update to resume, confirm, roll back or report); `requests`
and `cryptography` load only inside the functions that download and verify. LazyOta lives here rather
than in a module of its own: a module costs ~0.35 M instructions to find and load (issue 24).
"""


from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from agent.component import Component

FIRMWARE_OPERATION = "515,"


class LazyOta(Component):
    name = "ota"

    def __init__(self, config: Any, factory: Callable[[], Any]) -> None:
        self.state_file = config.state.ota_state  # only its existence is asked: agent.ota.machine loads with the work
        self._factory = factory
        self._agent: Any = None

    def _updater(self) -> Any:
        if self._agent is None:
            self._agent = self._factory()
        return self._agent

    def _has_work(self) -> bool:
        return self._agent is not None or os.path.exists(self.state_file)

    def on_boot(self) -> str:
        return self._updater().on_boot() if self._has_work() else "ota: no update state; running the base image"

    def on_session_up(self) -> None:
        if self._has_work():
            self._updater().on_session_up()

    def wake_at(self, now: float) -> float | None:
        return self._agent.wake_at(now) if self._agent is not None else None

    def tick(self, now: float) -> None:
        if self._agent is not None:
            self._agent.tick(now)

    def on_operation(self, line: str) -> bool:
        if not line.startswith(FIRMWARE_OPERATION):
            return False
        return bool(self._updater().on_operation(line))

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
