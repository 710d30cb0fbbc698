"""The connection's vocabulary: typed events in (driver -> machine) and actions out (machine ->
driver), as plain value objects. See agent/core/connection.py for what each one does to the machine.
Discovery and renewal proof have their own few (agent/core/supervisor_events.py), which a board never
loads.

Written in the CPython/MicroPython common subset (no dataclasses, typing or f-strings); the types of
the fields are in events.pyi, for mypy.
"""

from agent.core.errors import CoreError

# Why a connection attempt failed, as the driver classifies its transport error.
UNREACHABLE = "unreachable"  # DNS, TCP refused, timeout: the endpoint is down or away
TLS_VERIFY = "tls_verify"    # the broker's certificate did not verify: its CA may have rotated
REFUSED = "refused"          # the broker refused us: TLS alert, CONNACK refused, closed before CONNACK
KINDS = (UNREACHABLE, TLS_VERIFY, REFUSED)


class _Value:
    """Plain value object: positional fields named by FIELDS, equality and repr from them
    (MicroPython has no dataclasses). A field left out takes the class attribute of that name (its
    default); CoreError when there is none or too many are given. One shared ``__init__`` keeps
    each event class to its name and fields, which is what a small board's heap can afford."""

    FIELDS = ()

    def __init__(self, *args):
        fields = self.FIELDS
        n = len(args)
        if n > len(fields):
            raise CoreError(type(self).__name__, "expected at most %d fields, got %d" % (len(fields), n))
        for i in range(n):
            setattr(self, fields[i], args[i])
        if n < len(fields):
            for name in fields[n:]:
                if not hasattr(self, name):
                    raise CoreError(type(self).__name__ + "." + name, "required")

    def __eq__(self, other):
        return type(self) is type(other) and all(getattr(self, f) == getattr(other, f) for f in self.FIELDS)

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join("%s=%r" % (f, getattr(self, f)) for f in self.FIELDS))


# -- events (driver -> supervisor) -------------------------------------------------------------------

class Start(_Value):
    """Boot finished: begin connecting (or discover first when no endpoint is known)."""


class Tick(_Value):
    """Time passed (``now`` given to ``handle``): fire due timers (backoff, token refresh)."""


class Stop(_Value):
    """Shut down: close the session, do nothing more."""


class ConnectFailed(_Value):
    """The attempt of ``epoch`` failed before the session was up; ``kind`` is one of KINDS."""

    FIELDS = ("epoch", "kind", "reason")

    def __init__(self, epoch, kind, reason=""):
        if kind not in KINDS:
            raise CoreError("ConnectFailed.kind", "expected one of %s, got %r" % (", ".join(KINDS), kind))
        self.epoch = epoch
        self.kind = kind
        self.reason = reason


class Connected(_Value):
    """The broker accepted the session of ``epoch`` (CONNACK 0)."""

    FIELDS = ("epoch",)


class Disconnected(_Value):
    """The established session of ``epoch`` ended."""

    FIELDS = ("epoch", "reason")
    reason = ""


class Message(_Value):
    """A PUBLISH received on the session of ``epoch``."""

    FIELDS = ("epoch", "topic", "payload")


class Acked(_Value):
    """The broker acknowledged (PUBACK) packet ``mid`` of the session of ``epoch``."""

    FIELDS = ("epoch", "mid")


class TokenWanted(_Value):
    """A consumer was refused with the current token (HTTP 401): ask for a new one now."""


# -- actions (supervisor -> driver) ------------------------------------------------------------------

class Connect(_Value):
    """Open a session to ``endpoint`` with the current pair; report it under ``epoch``."""

    FIELDS = ("epoch", "endpoint")


class Close(_Value):
    """Close the session of ``epoch`` (renewal proof, shutdown, a stale session)."""

    FIELDS = ("epoch",)


class WaitUntil(_Value):
    """Nothing to do before ``at`` (device clock) unless an event arrives."""

    FIELDS = ("at",)


class Subscribe(_Value):
    FIELDS = ("epoch", "topic", "qos")
    qos = 1


class Publish(_Value):
    FIELDS = ("epoch", "topic", "payload", "qos")
    qos = 1


class SessionUp(_Value):
    """The session of ``epoch`` to ``endpoint`` is live: remember it, tell the components."""

    FIELDS = ("epoch", "endpoint")


class SessionDown(_Value):
    """The live session ended (``reason``); its in-flight messages go again on the next one."""

    FIELDS = ("epoch", "reason")


class AttemptFailed(_Value):
    """A connection attempt to ``endpoint`` failed (for status and logs)."""

    FIELDS = ("endpoint", "kind", "reason")


class Backoff(_Value):
    """Every endpoint failed: the next round starts at ``at`` (``seconds`` from now)."""

    FIELDS = ("at", "seconds", "endpoints")


class Operation(_Value):
    """One SmartREST line from the downstream topic for the components (OTA, ...)."""

    FIELDS = ("line",)


class Deliver(_Value):
    """A message on any other topic, for the components."""

    FIELDS = ("topic", "payload")


class Delivered(_Value):
    """Packet ``mid`` of the current session was acknowledged (the outbox may forget it)."""

    FIELDS = ("mid",)


class TokenAdopted(_Value):
    """A new access token (``schedule`` is its TokenSchedule): persist it, wake its waiters."""

    FIELDS = ("token", "schedule")


class Problem(_Value):
    """Something the driver should log (and show in status); ``what`` names the concern."""

    FIELDS = ("what", "detail")

