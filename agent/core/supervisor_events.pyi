"""Types of agent/core/supervisor_events.py for mypy (kept in step by tests/unit/test_supervisor.py)."""

from agent.core.endpoints import Endpoint
from agent.core.events import _Value

class Discovered(_Value):
    endpoints: list[Endpoint] | None
    def __init__(self, endpoints: list[Endpoint] | None) -> None: ...


class RenewalStaged(_Value):
    pass


class ProveCandidate(_Value):
    epoch: int
    endpoint: Endpoint
    def __init__(self, epoch: int, endpoint: Endpoint) -> None: ...


class Promote(_Value):
    pass


class Disprove(_Value):
    reason: str
    def __init__(self, reason: str) -> None: ...


class Rediscover(_Value):
    why: str
    def __init__(self, why: str) -> None: ...
