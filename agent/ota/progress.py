"""When a download's progress is worth a write and a report: pure arithmetic on bytes done."""

from __future__ import annotations

PUBLISH_STEP = 10   # percent between progress events on the wire
PERSIST_STEP = 2    # percent between progress writes to the state file (for `tether ota status`)


class ProgressMarks:
    """The last percentages persisted and published, for one download."""

    def __init__(self) -> None:
        self.published = -1
        self.persisted = -1

    def passed(self, done: int, total: int) -> tuple[bool, int | None]:
        """(persist now, the percentage to publish or None) for `done` of `total` bytes."""
        percent = done * 100 // total if total else 100
        persist = percent >= self.persisted + PERSIST_STEP or percent == 100
        if persist:
            self.persisted = percent
        publish = percent >= self.published + PUBLISH_STEP or (percent == 100 and self.published != 100)
        if publish:
            self.published = percent
        return persist, percent if publish else None
