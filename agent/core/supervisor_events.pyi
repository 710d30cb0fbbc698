"""Types of agent/core/supervisor_events.py for mypy (kept in step by tests/unit/test_supervisor.py)."""

from typing import Any

from agent.core import events

DISCOVERED: int
RENEWAL_STAGED: int
PROVE_CANDIDATE: int
PROMOTE: int
DISPROVE: int
REDISCOVER: int


class Event(events.Event):
    # the fields of the supervisor's types that events.Event does not declare
    why: str
    def __init__(self, type: int, *fields: Any) -> None: ...  # noqa: A002
