"""The events and actions only the Linux agent's supervisor knows: discovery and the proof of a renewed
certificate/key pair (agent/core/supervisor.py). A board takes its endpoints from its own config and
renews nothing, so it never loads these (agent/core/events.py holds the rest of the vocabulary).

Written in the CPython/MicroPython common subset; field types in supervisor_events.pyi, for mypy.
"""

from agent.core.events import _Value

# -- events (driver -> supervisor) -------------------------------------------------------------------


class Discovered(_Value):
    """Answer to ``Rediscover``: the ordered endpoint list, or None when discovery failed."""

    FIELDS = ("endpoints",)


class RenewalStaged(_Value):
    """A renewed pair waits to be proven. Which pair (chain file, key label) is the renewal record's
    to say (agent/renewal_state.py, its one owner); the supervisor only decides when to prove it."""


# -- actions (supervisor -> driver) ------------------------------------------------------------------

class ProveCandidate(_Value):
    """Open a session to ``endpoint`` with the staged pair (the driver asks its owner which it is)."""

    FIELDS = ("epoch", "endpoint")


class Promote(_Value):
    """The staged pair established a session: make it the current pair (it already carries it)."""


class Disprove(_Value):
    """The staged pair was refused: drop it and keep the current pair."""

    FIELDS = ("reason",)


class Rediscover(_Value):
    """Ask the discovery service for the endpoint list; answer with ``Discovered``."""

    FIELDS = ("why",)
