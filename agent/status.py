"""The running agent's state as others see it: a small JSON file in the state directory.

`tether run` writes it on every state change (session up/down, endpoint, last error, token);
`tether status` reads it. Plain JSON so a shell script or a support tool can read it too. One
`StatusFile` per process owns it: the runtime's control loop (other threads post their updates
to the loop), so no update is lost to a concurrent read-modify-write.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from agent.config import Config
from agent.state import Record


def _record(config: Config) -> Record:
    # volatile: it describes this run only and every state change rewrites it, so a save is atomic
    # (readers never see half a file) but not fsynced; after a power cut the next update corrects it
    return Record(config.state.status, then="the next update writes it afresh", durable=False)


def read_runtime_status(config: Config) -> dict[str, Any]:
    return _record(config).load() or {}


class StatusFile:
    """The status kept in memory and written whole on each update. `owner` is the only thread
    allowed to update it once set (the runtime sets it to its control loop)."""

    def __init__(self, config: Config) -> None:
        self.record = _record(config)
        self.path = self.record.path
        self.config = config
        self.owner: threading.Thread | None = None
        self._status: dict[str, Any] | None = None

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` and write the file atomically; return the new status."""
        if self._status is None:
            self._status = read_runtime_status(self.config)
        self._status.update(fields)
        self._status["updated_at"] = int(time.time())
        self.record.save(self._status)
        return dict(self._status)
