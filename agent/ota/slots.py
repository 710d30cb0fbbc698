"""The slot backend (or installer) named by `[ota] slots`, with its options from the `[ota]` section."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hal.slots import SlotBackend, open_slots


def open_configured(config: Any, progress: Callable[[str], None] | None = None,
                    floor: Callable[[], str] | None = None) -> SlotBackend:
    """Open `[ota] slots` in `[ota] slots_dir`; `progress` and `floor` are the installers' hooks."""
    ota = config.ota
    return open_slots(ota.slots, ota.slots_dir or config.state.slots, env_config=ota.uboot_env_config,
                      install_command=ota.install_command, commit_command=ota.commit_command,
                      rollback_command=ota.rollback_command, rauc_slot_class=ota.rauc_slot_class,
                      progress=progress, floor=floor)
