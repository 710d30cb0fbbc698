"""The slot backend (or installer) named by `[ota] slots`, with its options from the `[ota]` section."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hal.slots import SLOT_OPTIONS, SlotBackend, open_slots, slot_backend


def open_configured(config: Any, progress: Callable[[str], None] | None = None,
                    floor: Callable[[], str] | None = None) -> SlotBackend:
    """Open `[ota] slots` in `[ota] slots_dir` with the [ota] options that backend declares;
    `progress` and `floor` are the installers' hooks. An option set for another backend (an
    install_command beside directory slots) is refused with SlotError naming the key, not ignored."""
    ota = config.ota
    entry = slot_backend(ota.slots)
    defaults = type(ota)()
    options = {key: getattr(ota, key) for key in sorted(SLOT_OPTIONS)
               if key in entry.options or getattr(ota, key) != getattr(defaults, key)}
    return open_slots(ota.slots, ota.slots_dir or config.state.slots, options, progress=progress, floor=floor)
