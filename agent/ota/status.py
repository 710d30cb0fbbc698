"""What `tether ota status` shows, readable without a running agent (the state files are the truth)."""

from __future__ import annotations

from typing import Any

from agent.ota.machine import Installed, OtaState, StateStore
from agent.ota.slots import open_configured
from hal import TetherError
from hal.slots import SlotBackend


def describe(state: OtaState, installed: Installed, slots: SlotBackend | None, running: bool | None = None
             ) -> dict[str, Any]:
    """A JSON-ready summary: state, operation, progress, installed version and floor, slots."""
    op = state.operation
    out: dict[str, Any] = {
        "state": state.state,
        "operation": {"name": op.name, "version": op.version, "url": op.url} if op else None,
        "installed": {"name": installed.name, "version": installed.version, "floor": installed.floor},
        "reason": state.reason,
        "reported": state.reported,
        "progress": {"bytes": state.downloaded, "size": state.size,
                     "percent": (state.downloaded * 100 // state.size) if state.size else None},
        "target_slot": state.target or None,
        "deadline": state.deadline or None,
        "updated": state.updated or None,
    }
    if running is not None:
        out["worker_running"] = running
    if slots is not None:
        try:
            out["slots"] = slots.describe()
        except TetherError as exc:
            out["slots"] = {"error": str(exc)}
    return out


def read_status(config: Any) -> dict[str, Any]:
    """The status from the files in the state directory, as the running agent would report it."""
    store = StateStore(config.state.ota)

    try:
        slots: SlotBackend | None = open_configured(config)
    except TetherError:
        slots = None
    return describe(store.load(), store.installed(config.ota.base_version), slots)
