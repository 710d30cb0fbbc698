"""An OtaAgent on a control loop of its own, as `tether run` runs it (agent/control.py's `tick` and
`next`, the same calls the runtime's loop makes), without a broker: the tests' calls are handed to
the loop with `call_soon` and wait for their result there, so the updater is only ever touched on
its loop's thread, as in the agent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from agent.config import Config
from agent.control import ControlLoop
from agent.ota.agent import OtaAgent
from agent.state import StatusFile
from hal.slots import SlotBackend
from lab.procs import wait_until

T = TypeVar("T")


class LoopUpdater:
    """`make(call_soon)` builds the OtaAgent; its loop runs until `close()`."""

    def __init__(self, config: Config, make: Callable[[Callable[[Callable[[], None]], None]], OtaAgent]) -> None:
        self.loop = ControlLoop(StatusFile(config))
        self.agent = make(self.loop.call_soon)
        self._thread = threading.Thread(target=self._serve, name="test-control-loop", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        components = [self.agent]
        while not self.loop.stopping.is_set():
            self.loop.tick(components, time.time())
            self.loop.next(components, time.time, cap=1.0)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """`fn()` run on the loop; its result (or its exception, raised here)."""
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((fn(), None))
            except BaseException as exc:
                box.append((None, exc))
            done.set()

        self.loop.call_soon(run)
        if not done.wait(timeout):
            raise TimeoutError(f"the control loop did not run {fn} within {timeout} s")
        value, error = box[0]
        if error is not None:
            raise error
        return value  # type: ignore[no-any-return]

    @property
    def slots(self) -> SlotBackend:
        return self.agent.slots

    def on_boot(self) -> str:
        return self.call(self.agent.on_boot)

    def on_session_up(self) -> None:
        self.call(self.agent.on_session_up)

    def on_operation(self, line: str) -> bool:
        return self.call(lambda: self.agent.on_operation(line))

    def status(self) -> dict[str, Any]:
        return self.call(self.agent.status)

    def wake_at(self) -> float | None:
        return self.call(lambda: self.agent.wake_at(time.time()))

    def join(self, timeout: float = 600.0) -> bool:
        """Wait until the updater has no step running and no retry due; True when it got there."""
        wait_until(lambda: not self.call(self.agent.working), timeout, "the OTA work to finish",
                   describe=self.status)
        return True

    def close(self) -> None:
        """The process ends: the loop stops, then the updater closes (as `Runtime.run` does)."""
        if self._thread.is_alive():
            self.loop.stop()
            self._thread.join(10)
            self.agent.close()
