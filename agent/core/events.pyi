"""Types of agent/core/events.py for mypy (the module itself is untyped: it runs on MicroPython).

Event declares every field any type carries; which ones a type sets is FIELDS[type]. Kept in step
with the module by tests/unit/test_supervisor.py (every constant, every field).
"""

from typing import Any, ClassVar

from agent.core.endpoints import Endpoint
from agent.core.token_schedule import TokenSchedule

UNREACHABLE: str
TLS_VERIFY: str
REFUSED: str
KINDS: tuple[str, ...]

START: int
TICK: int
STOP: int
CONNECT_FAILED: int
CONNECTED: int
DISCONNECTED: int
MESSAGE: int
ACKED: int
TOKEN_WANTED: int
CONNECT: int
CLOSE: int
WAIT_UNTIL: int
SUBSCRIBE: int
PUBLISH: int
SESSION_UP: int
SESSION_DOWN: int
ATTEMPT_FAILED: int
BACKOFF: int
OPERATION: int
DELIVER: int
DELIVERED: int
TOKEN_ADOPTED: int
PROBLEM: int

NAMES: str
FIELDS: tuple[tuple[str, ...], ...]
DEFAULTS: tuple[tuple[Any, ...], ...]


class Event:
    NAMES: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, ...], ...]]
    DEFAULTS: ClassVar[tuple[tuple[Any, ...], ...]]
    type: int
    # every field of events.FIELDS, typed
    epoch: int
    kind: str
    reason: str
    topic: str
    payload: bytes | str
    mid: int
    endpoint: Endpoint
    at: float
    qos: int
    seconds: float
    endpoints: Any  # BACKOFF: how many (int); DISCOVERED (supervisor_events): the list, or None
    line: str
    token: str
    schedule: TokenSchedule
    what: str
    detail: str
    def __init__(self, type: int, *fields: Any) -> None: ...  # noqa: A002
    def name(self) -> str: ...
    def fields(self) -> tuple[str, ...]: ...
