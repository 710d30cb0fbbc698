"""Certificate renewal's state machine as data, and its record (`<state_dir>/renewal.json`).

The one owner of "a renewed pair is staged": the supervisor is only told that one is (`RenewalStaged`,
no fields) and decides which session attempt proves it (`ProveCandidate`, no pair either); the runtime
asks `Renewal.candidate()`, read from this record, which chain and key to use. Every state is written
(atomically, agent/state.py) before the action it announces, as agent/ota/machine.py does, so a
restart finds the step it was on.

    idle --staged--> staged --proven--> promoting --promoted--> idle
    staged --disproven--> idle (retry after a backoff);  idle --failed--> idle (retry, or stop if fatal)
    staged --staged--> staged (`renew_now` again: the newer pair replaces the staged one)
"""

from __future__ import annotations

from typing import Any

from agent.errors import AgentError
from hal.value import Value

TRANSITIONS: dict[tuple[str, str], str] = {
    ("idle", "staged"): "staged",
    ("idle", "failed"): "idle",
    ("staged", "staged"): "staged",
    ("staged", "proven"): "promoting",
    ("staged", "disproven"): "idle",
    ("promoting", "promoted"): "idle",
}
STATES = frozenset(state for pair in TRANSITIONS for state in pair[:1]) | frozenset(TRANSITIONS.values())


class RenewalTransitionError(AgentError):
    """An event the renewal table has no edge for, or a record naming an unknown state."""


class RenewalState(Value):
    """renewal.json: the step, the staged key's label, when to try again, and the last error. A Value,
    not a dataclass: it is built at every start, where `dataclasses` is not loaded (hal/value.py)."""

    state: str = "idle"
    key: str | None = None          # the label of the staged pair's key (a new key with [renewal] new_key)
    next_try: float = 0             # device time before which no attempt starts (a backoff, Retry-After)
    error: str | None = None        # the last failure, for status.json
    updated_at: int = 0

    def advance(self, event: str, now: float, **changes: Any) -> RenewalState:
        """The state after `event`; RenewalTransitionError naming state and event if there is no edge."""
        try:
            nxt = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise RenewalTransitionError(f"renewal state machine: event {event!r} is not allowed in state "
                                         f"{self.state!r}") from None
        return self._replace(state=nxt, updated_at=int(now), **changes)

    def to_fields(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_fields(cls, raw: dict[str, Any]) -> RenewalState:
        """The state from a record's fields; RenewalTransitionError naming what is wrong."""
        try:
            state = cls(**raw)
        except TypeError as exc:
            raise RenewalTransitionError(f"unreadable renewal state ({exc})") from None
        if state.state not in STATES:
            raise RenewalTransitionError(f"unknown renewal state {state.state!r}")
        return state
