"""The events and actions only the Linux agent's supervisor knows: discovery and the proof of a renewed
certificate/key pair (agent/core/supervisor.py). A board takes its endpoints from its own config and
renews nothing, so it never loads these (agent/core/events.py holds the rest of the vocabulary).

``Event`` here is agent.core.events.Event with these types appended to its tables; the Linux agent
builds every event through it (agent.core.supervisor re-exports it).

Written in the CPython/MicroPython common subset; field types in supervisor_events.pyi, for mypy.
"""

from agent.core import events

# -- events (driver -> supervisor) -------------------------------------------------------------------
DISCOVERED = 23       # answer to REDISCOVER: the ordered ``endpoints``, or None when discovery failed
RENEWAL_STAGED = 24   # a renewed pair waits to be proven (which pair is the renewal record's to say,
#                       agent/renewal.py; the supervisor only decides when to prove it)
# -- actions (supervisor -> driver) ------------------------------------------------------------------
PROVE_CANDIDATE = 25  # open a session to ``endpoint`` with the staged pair (the driver asks its owner which)
PROMOTE = 26          # the staged pair established a session: make it the current pair
DISPROVE = 27         # the staged pair was refused (``reason``): drop it and keep the current pair
REDISCOVER = 28       # ask the discovery service for the endpoint list (``why``); answer with DISCOVERED


class Event(events.Event):
    """agent.core.events.Event, knowing the supervisor's types as well."""

    NAMES = events.NAMES + " Discovered RenewalStaged ProveCandidate Promote Disprove Rediscover"
    FIELDS = events.FIELDS + (("endpoints",), (), ("epoch", "endpoint"), (), ("reason",), ("why",))
    DEFAULTS = events.DEFAULTS + ((), (), (), (), (), ())
