"""The agent's systemd glue lives in `hal.systemd`, shared with the station (which may not import agent)."""

from __future__ import annotations

from hal.systemd import notify, watchdog_interval

__all__ = ["notify", "watchdog_interval"]
