"""The connection's vocabulary: events in (driver -> machine) and actions out (machine -> driver),
as instances of one value class, ``Event``, told apart by ``type`` (a small int, below). See
agent/core/connection.py for what each one does to the machine. Discovery and renewal proof have
their own few (agent/core/supervisor_events.py extends these tables), which a board never loads.

Why one class and not a class per event: on a board every class costs heap even when frozen (its
type object, its dict, its bases), about 135 bytes each on 32-bit and 250 on 64-bit, and 23 of them
were a fifth of the frozen image's import heap (issue 25). The fields and defaults below are constant
tuples, which a frozen image keeps in flash; the names are one string, which a ROMFS image also keeps
in flash behind one heap object (a tuple of them cost an object per name there).

Written in the CPython/MicroPython common subset (no dataclasses, typing or f-strings); the types of
the fields are in events.pyi, for mypy.
"""

from agent.core.errors import CoreError

# Why a connection attempt failed, as the driver classifies its transport error.
UNREACHABLE = "unreachable"  # DNS, TCP refused, timeout: the endpoint is down or away
TLS_VERIFY = "tls_verify"    # the broker's certificate did not verify: its CA may have rotated
REFUSED = "refused"          # the broker refused us: TLS alert, CONNACK refused, closed before CONNACK
KINDS = (UNREACHABLE, TLS_VERIFY, REFUSED)

# -- events (driver -> machine); each line: the type, then what it says -------------------------
START = 0           # boot finished: begin connecting (or discover first when no endpoint is known)
TICK = 1            # time passed (``now`` given to ``handle``): fire due timers (backoff, token refresh)
STOP = 2            # shut down: close the session, do nothing more
CONNECT_FAILED = 3  # the attempt of ``epoch`` failed before the session was up; ``kind`` is one of KINDS
CONNECTED = 4       # the broker accepted the session of ``epoch`` (CONNACK 0)
DISCONNECTED = 5    # the established session of ``epoch`` ended
MESSAGE = 6         # a PUBLISH received on the session of ``epoch``
ACKED = 7           # the broker acknowledged (PUBACK) packet ``mid`` of the session of ``epoch``
TOKEN_WANTED = 8    # a consumer was refused with the current token (HTTP 401): ask for a new one now
# -- actions (machine -> driver) ------------------------------------------------------------------
CONNECT = 9         # open a session to ``endpoint`` with the current pair; report it under ``epoch``
CLOSE = 10          # close the session of ``epoch`` (renewal proof, shutdown, a stale session)
WAIT_UNTIL = 11     # nothing to do before ``at`` (device clock) unless an event arrives
SUBSCRIBE = 12
PUBLISH = 13
SESSION_UP = 14     # the session of ``epoch`` to ``endpoint`` is live: remember it, tell the components
SESSION_DOWN = 15   # the live session ended (``reason``); its in-flight messages go again on the next one
ATTEMPT_FAILED = 16  # a connection attempt to ``endpoint`` failed (for status and logs)
BACKOFF = 17        # every endpoint failed: the next round starts at ``at`` (``seconds`` from now)
OPERATION = 18      # one SmartREST line from the downstream topic for the components (OTA, ...)
DELIVER = 19        # a message on any other topic, for the components
DELIVERED = 20      # packet ``mid`` of the current session was acknowledged (the outbox may forget it)
TOKEN_ADOPTED = 21  # a new access token (``schedule`` is its TokenSchedule): persist it, wake its waiters
PROBLEM = 22        # something the driver should log (and show in status); ``what`` names the concern

# Indexed by type: the name traces and errors show (NAMES, one string of words: only a trace or an
# error splits it, and from a ROMFS image one string is one object in the heap where a tuple of 23 is
# 24), the fields in order, the defaults of the last ones.
NAMES = ("Start Tick Stop ConnectFailed Connected Disconnected Message Acked TokenWanted Connect Close "
         "WaitUntil Subscribe Publish SessionUp SessionDown AttemptFailed Backoff Operation Deliver Delivered "
         "TokenAdopted Problem")
FIELDS = ((), (), (), ("epoch", "kind", "reason"), ("epoch",), ("epoch", "reason"), ("epoch", "topic", "payload"),
          ("epoch", "mid"), (), ("epoch", "endpoint"), ("epoch",), ("at",), ("epoch", "topic", "qos"),
          ("epoch", "topic", "payload", "qos"), ("epoch", "endpoint"), ("epoch", "reason"),
          ("endpoint", "kind", "reason"), ("at", "seconds", "endpoints"), ("line",), ("topic", "payload"), ("mid",),
          ("token", "schedule"), ("what", "detail"))
DEFAULTS = ((), (), (), ("",), (), ("",), (), (), (), (), (), (), (1,), (1,), (), (), (), (), (), (), (), (), ())


class Event:
    """One event or action: ``Event(type, *fields)``, the fields positional in FIELDS[type] order,
    the last ones optional when DEFAULTS[type] gives them. Equality and repr from the type and the
    fields. CoreError for an unknown type, a field too many or a required one missing; a
    CONNECT_FAILED whose ``kind`` is not one of KINDS."""

    NAMES = NAMES
    FIELDS = FIELDS
    DEFAULTS = DEFAULTS

    def __init__(self, type, *args):  # noqa: A002 - the event's type, as h11 and MQTT say it
        if not 0 <= type < len(self.FIELDS):
            raise CoreError("event.type", "unknown event type %r" % (type,))
        self.type = type
        fields = self.FIELDS[type]
        given = len(args)
        defaults = self.DEFAULTS[type]
        if given > len(fields) or given < len(fields) - len(defaults):
            raise CoreError(self.name(), "expected %d to %d fields (%s), got %d" % (
                len(fields) - len(defaults), len(fields), ", ".join(fields), given))
        for i in range(len(fields)):
            setattr(self, fields[i], args[i] if i < given else defaults[i - len(fields) + len(defaults)])
        if type == CONNECT_FAILED and self.kind not in KINDS:
            raise CoreError("ConnectFailed.kind", "expected one of %s, got %r" % (", ".join(KINDS), self.kind))

    def name(self):
        """The type's name, as traces and errors show it (``Connect``)."""
        return self.NAMES.split()[self.type]

    def fields(self):
        """The field names, in order."""
        return self.FIELDS[self.type]

    def __eq__(self, other):
        return (isinstance(other, Event) and self.type == other.type
                and all(getattr(self, f) == getattr(other, f) for f in self.fields()))

    def __repr__(self):
        return "%s(%s)" % (self.name(), ", ".join("%s=%r" % (f, getattr(self, f)) for f in self.fields()))
