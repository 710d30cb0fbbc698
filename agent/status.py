"""The running agent's state as others see it: a small JSON file in the state directory.

`tether run` writes it on every state change (session up/down, endpoint, last error, token);
`tether status` reads it. Plain JSON so a shell script or a support tool can read it too.
"""

from __future__ import annotations

import time
from typing import Any

from agent.config import Config
from hal import storage

STATUS_FILE = "status.json"


def read_runtime_status(config: Config) -> dict[str, Any]:
    return storage.read_json(config.state_dir / STATUS_FILE)


def write_runtime_status(config: Config, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the status file (atomically) and return the new status."""
    status = read_runtime_status(config)
    status.update(fields)
    status["updated_at"] = int(time.time())
    storage.write_json(config.state_dir / STATUS_FILE, status)
    return status
