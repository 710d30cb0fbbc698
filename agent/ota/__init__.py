"""Over-the-air updates: signed release, resumable download into the inactive slot, switch, commit or roll back.

Importing this package is cheap on purpose (the agent imports it at start): `requests` and
`cryptography` load only inside the functions that download and verify. Entry point: `OtaAgent`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OtaAgent"]


def __getattr__(name: str) -> Any:
    # Lazy so `import agent.ota` stays light; agent/ota/agent.py is itself stdlib-only at import.
    if name == "OtaAgent":
        from agent.ota.agent import OtaAgent

        return OtaAgent
    raise AttributeError(name)
