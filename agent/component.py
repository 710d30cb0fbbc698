"""What the runtime's control loop calls on its components (renewal, OTA, outbox, publish socket).

One base class with a no-op default for every hook, so a component subclasses it and implements only
what it needs, and the loop calls every hook on every component without `hasattr`. A plain class, not
a `typing.Protocol`: every component subclasses it anyway, and each subclass of a Protocol goes
through typing's machinery when it is defined, four of them on every start (issue 24). All hooks run on
the control loop's thread; a component with work of its own (a download, an EST exchange) runs it
in a worker thread that hands its result back through `Runtime.call_soon`, never by changing state
the loop reads.
"""

from __future__ import annotations


class Component:
    name: str = "component"

    def on_boot(self) -> str | None:
        """Before the first connection: resume or report interrupted work; a line for the log."""
        return None

    def on_session_up(self) -> None:
        """A session is live (subscriptions sent)."""
        return None

    def on_session_down(self) -> None:
        """The live session ended; messages in flight go again on the next one."""
        return None

    def on_operation(self, line: str) -> bool:
        """A SmartREST line from the downstream topic; True when this component handled it."""
        return False

    def on_acked(self, mid: int) -> None:
        """The broker acknowledged message `mid` of the current session."""
        return None

    def tick(self, now: float) -> None:
        """Called after every event and once the time `wake_at` asked for has come (device time `now`)."""
        return None

    def wake_at(self, now: float) -> float | None:
        """The device time by which `tick` must run again, or None when only an event can give this
        component work. The loop sleeps until the earliest of these (a device at rest stays asleep)."""
        return None

    def close(self) -> None:
        """The agent is stopping."""
        return None
