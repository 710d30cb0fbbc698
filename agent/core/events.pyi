"""Types of agent/core/events.py for mypy (the module itself is untyped: it runs on MicroPython).

Kept in step with the module by tests/unit/test_supervisor.py (class names and FIELDS).
"""

from typing import Any, ClassVar

from agent.core.endpoints import Endpoint
from agent.core.token_schedule import TokenSchedule

UNREACHABLE: str
TLS_VERIFY: str
REFUSED: str
KINDS: tuple[str, ...]


class _Value:
    FIELDS: ClassVar[tuple[str, ...]]
    def __init__(self, *args: Any) -> None: ...


class Start(_Value):
    pass


class Tick(_Value):
    pass


class Stop(_Value):
    pass


class ConnectFailed(_Value):
    epoch: int
    kind: str
    reason: str
    def __init__(self, epoch: int, kind: str, reason: str = "") -> None: ...


class Connected(_Value):
    epoch: int
    def __init__(self, epoch: int) -> None: ...


class Disconnected(_Value):
    epoch: int
    reason: str
    def __init__(self, epoch: int, reason: str = "") -> None: ...


class Message(_Value):
    epoch: int
    topic: str
    payload: bytes | str
    def __init__(self, epoch: int, topic: str, payload: bytes | str) -> None: ...


class Acked(_Value):
    epoch: int
    mid: int
    def __init__(self, epoch: int, mid: int) -> None: ...




class TokenWanted(_Value):
    pass


class Connect(_Value):
    epoch: int
    endpoint: Endpoint
    def __init__(self, epoch: int, endpoint: Endpoint) -> None: ...





class Close(_Value):
    epoch: int
    def __init__(self, epoch: int) -> None: ...


class WaitUntil(_Value):
    at: float
    def __init__(self, at: float) -> None: ...



class Subscribe(_Value):
    epoch: int
    topic: str
    qos: int
    def __init__(self, epoch: int, topic: str, qos: int = 1) -> None: ...


class Publish(_Value):
    epoch: int
    topic: str
    payload: bytes | str
    qos: int
    def __init__(self, epoch: int, topic: str, payload: bytes | str, qos: int = 1) -> None: ...


class SessionUp(_Value):
    epoch: int
    endpoint: Endpoint
    def __init__(self, epoch: int, endpoint: Endpoint) -> None: ...


class SessionDown(_Value):
    epoch: int
    reason: str
    def __init__(self, epoch: int, reason: str) -> None: ...


class AttemptFailed(_Value):
    endpoint: Endpoint
    kind: str
    reason: str
    def __init__(self, endpoint: Endpoint, kind: str, reason: str) -> None: ...


class Backoff(_Value):
    at: float
    seconds: float
    endpoints: int
    def __init__(self, at: float, seconds: float, endpoints: int) -> None: ...


class Operation(_Value):
    line: str
    def __init__(self, line: str) -> None: ...


class Deliver(_Value):
    topic: str
    payload: bytes | str
    def __init__(self, topic: str, payload: bytes | str) -> None: ...


class Delivered(_Value):
    mid: int
    def __init__(self, mid: int) -> None: ...


class TokenAdopted(_Value):
    token: str
    schedule: TokenSchedule
    def __init__(self, token: str, schedule: TokenSchedule) -> None: ...


class Problem(_Value):
    what: str
    detail: str
    def __init__(self, what: str, detail: str) -> None: ...
