"""The Linux agent's connection supervisor: agent/core/connection.py's machine plus discovery and the
proof of a renewed certificate/key pair. Pure; ``tether run`` and ``tether check`` drive it through
``drive()``. A board runs the Connection alone and never loads this module or its events.

What it adds to the connection's decisions (DESIGN.md "Endpoints", "Data flow of one boot"):
- with no endpoint known, it asks discovery first; a round that fails, or a broker certificate that
  no longer verifies, asks for re-discovery at most once per round;
- a renewed certificate/key pair (``RenewalStaged``) is proven by the next session attempt
  (``ProveCandidate``); it is promoted only when that session is accepted (``Promote``), dropped
  when the broker refuses it (``Disprove``); an unreachable endpoint or an unverifiable broker
  says nothing about our pair, so the next endpoint proves it instead.

Written in the CPython/MicroPython common subset (no typing, dataclasses or f-strings).
"""

from agent.core.connection import (
    CONNECTING,
    DISCOVERING,
    IDLE,
    ONLINE,
    STOPPED,
    WAITING,
    Connection,
    drive,
)
from agent.core.endpoints import Rotation
from agent.core.events import (
    ACKED,
    ATTEMPT_FAILED,
    BACKOFF,
    CLOSE,
    CONNECT,
    CONNECT_FAILED,
    CONNECTED,
    DELIVER,
    DELIVERED,
    DISCONNECTED,
    KINDS,
    MESSAGE,
    OPERATION,
    PROBLEM,
    PUBLISH,
    REFUSED,
    SESSION_DOWN,
    SESSION_UP,
    START,
    STOP,
    SUBSCRIBE,
    TICK,
    TLS_VERIFY,
    TOKEN_ADOPTED,
    TOKEN_WANTED,
    UNREACHABLE,
    WAIT_UNTIL,
)
from agent.core.supervisor_events import (
    DISCOVERED,
    DISPROVE,
    PROMOTE,
    PROVE_CANDIDATE,
    REDISCOVER,
    RENEWAL_STAGED,
    Event,
)

# the vocabulary is re-exported: drivers write supervisor.Event(supervisor.CONNECT, ...), supervisor.TICK, ...
# (Event is supervisor_events.Event: it knows the supervisor's types too)
__all__ = [
    "Supervisor", "Event", "drive", "KINDS", "REFUSED", "TLS_VERIFY", "UNREACHABLE", "ACKED", "ATTEMPT_FAILED",
    "BACKOFF", "CLOSE", "CONNECT", "CONNECTED", "CONNECT_FAILED", "DELIVER", "DELIVERED", "DISCONNECTED",
    "DISCOVERED", "DISPROVE", "MESSAGE", "OPERATION", "PROBLEM", "PROMOTE", "PROVE_CANDIDATE", "PUBLISH",
    "REDISCOVER", "RENEWAL_STAGED", "SESSION_DOWN", "SESSION_UP", "START", "STOP", "SUBSCRIBE", "TICK",
    "TOKEN_ADOPTED", "TOKEN_WANTED", "WAIT_UNTIL", "IDLE", "DISCOVERING", "WAITING", "CONNECTING", "ONLINE",
    "STOPPED",
]

_ALIVE = (IDLE, WAITING, CONNECTING, DISCOVERING, ONLINE)
_C = Connection


class Supervisor(Connection):
    """The connection machine with discovery and renewal proof. ``handle(event, now)`` -> actions.

    Arguments as Connection's, plus ``discovery``: True when a discovery service can be asked (then
    ``endpoints`` may be empty). Raises EndpointError when no endpoint is known and discovery is off.
    """

    def __init__(self, endpoints, backoff, topics, rand, refresher=None, discovery=False, heartbeat=None):
        self.discovery = discovery
        self.staged = False        # renewal staged a pair (its record says which), until proven or disproven
        self.proving = False       # the current attempt uses the candidate
        self.rediscovered = False  # at most one re-discovery per round
        Connection.__init__(self, endpoints, backoff, topics, rand, refresher, heartbeat)

    # -- questions the Linux agent's drivers ask (a board needs none of them) ----------------------
    def online(self):
        """True while a session is up."""
        return self.state == ONLINE

    def token_refresher(self):
        """The TokenRefresher (for status pages), or None without tokens."""
        return self.refresher

    def endpoint_errors(self):
        """A copy of endpoint url -> reason of its last failure."""
        return dict(self.errors)

    # -- transitions of its own --------------------------------------------------------------------
    def _discovered(self, event, now, out):
        if event.endpoints:
            last_good = self.rotation.last_good if self.rotation is not None else None
            self.rotation = Rotation(event.endpoints)
            self.rotation.last_good = last_good
        elif self.rotation is None:
            out.append(Event(PROBLEM, "discovery", "no endpoint known yet; asking again after a backoff"))
            self._wait(now, out, "discovery")
            return
        self._next(now, out)

    def _renewal_staged(self, event, now, out):
        self.staged = True
        if self.state == ONLINE:
            out.append(Event(CLOSE, self.epoch))
            self._down("reconnecting to prove the renewed certificate", out)
            self._attempt(now, out)  # the rotation starts at the endpoint that just worked

    # Connection.TRANSITIONS with the DISCOVERING state (only Stop acts there; everything else a
    # session or a timer says is about no attempt while discovery is asked) and two more events.
    TRANSITIONS = {  # type: dict
        START: (_C._start, (IDLE,), (STOPPED,)),
        STOP: (_C._stop, _ALIVE, (STOPPED,)),
        TICK: (_C._tick, (WAITING, ONLINE), (IDLE, CONNECTING, DISCOVERING, STOPPED)),
        CONNECT_FAILED: (_C._connect_failed, (CONNECTING,), (IDLE, WAITING, ONLINE, DISCOVERING, STOPPED)),
        CONNECTED: (_C._connected, (CONNECTING,), (STOPPED,)),
        DISCONNECTED: (_C._disconnected, (CONNECTING, ONLINE), (IDLE, WAITING, DISCOVERING, STOPPED)),
        MESSAGE: (_C._message, (ONLINE,), (IDLE, WAITING, CONNECTING, DISCOVERING, STOPPED)),
        ACKED: (_C._acked, (ONLINE,), (IDLE, WAITING, CONNECTING, DISCOVERING, STOPPED)),
        TOKEN_WANTED: (_C._token_wanted, (ONLINE,), (IDLE, WAITING, CONNECTING, DISCOVERING, STOPPED)),
        # a discovery answer matters only while the machine waits for it; a late one is dropped
        DISCOVERED: (_discovered, (DISCOVERING,), (IDLE, WAITING, CONNECTING, ONLINE, STOPPED)),
        # a pair staged at any time is proven by the next attempt (at once when a session is up)
        RENEWAL_STAGED: (_renewal_staged, _ALIVE, (STOPPED,)),
    }
    ACTIONS = Connection.ACTIONS + (  # type: tuple
        PROVE_CANDIDATE, PROMOTE, DISPROVE, REDISCOVER)

    # -- the hooks of Connection -------------------------------------------------------------------
    def _begin(self, now, out):
        if self.rotation is None:
            self._rediscover("no known endpoint", out)
        else:
            self._attempt(now, out)

    def _candidate_refused(self, event, now, out):
        if self.proving and event.kind == REFUSED:
            # the broker refused the renewed pair: drop it and try the same endpoint with the old
            # pair at once (it worked before, so this is not a failed endpoint yet)
            self.staged = False
            self.proving = False
            out.append(Event(DISPROVE, event.reason))
            self._attempt(now, out, self.endpoint)
            return True
        self.proving = False
        return False

    def _rediscover_after(self, event, out):
        if self.discovery and not self.rediscovered and (event.kind == TLS_VERIFY or self.rotation.round_failed()):
            why = "a broker certificate no longer verifies" if event.kind == TLS_VERIFY else "every endpoint failed"
            self._rediscover(why, out)
            return True
        return False

    def _accepted(self, out):
        if self.proving:
            self.proving = False
            self.staged = False
            out.append(Event(PROMOTE))
        self.rediscovered = False

    def _round_over(self):
        self.rediscovered = False

    def _connect_action(self):
        if self.staged:
            self.proving = True
            return Event(PROVE_CANDIDATE, self.epoch, self.endpoint)
        self.proving = False
        return Event(CONNECT, self.epoch, self.endpoint)

    def _rediscover(self, why, out):
        self.rediscovered = True
        self.state = DISCOVERING
        out.append(Event(REDISCOVER, why))
