"""Scenarios for the pure connection supervisor, run the same way by CPython and MicroPython.

Each scenario drives ``agent.core.supervisor.Supervisor`` with a fake clock (plain numbers) and
returns a JSON-able trace: one string per action, ``"Name field=value ..."``. tests/unit/
test_supervisor.py asserts on the CPython traces and checks that MicroPython produces the same
ones. Written in the CPython/MicroPython common subset, like the code it drives.
"""

import binascii

from agent.core import supervisor as sv
from agent.core.backoff import Backoff
from agent.core.endpoints import Endpoint
from agent.core.retry import Retry
from agent.core.token_schedule import TokenRefresher
from agent.core.topics import Topics

A = Endpoint("a.example", 8883)
B = Endpoint("b.example", 8883)
C = Endpoint("c.example", 8883, source="discovery")


def _b64url(raw):
    return binascii.b2a_base64(raw).decode().strip().replace("+", "-").replace("/", "_").rstrip("=")


def jwt(iat, exp):
    return "%s.%s.%s" % (_b64url(b'{"alg":"RS256"}'), _b64url(('{"iat":%d,"exp":%d}' % (iat, exp)).encode()),
                         _b64url(b"sig"))


def _show(action):
    parts = [action.name()]
    for f in action.fields():
        v = getattr(action, f)
        if isinstance(v, Endpoint):
            v = v.host
        elif isinstance(v, bytes):
            v = binascii.hexlify(v).decode() if b"\xff" in v else v.decode()
        elif isinstance(v, float) and v == int(v):
            v = int(v)
        elif f == "schedule":
            v = "refresh@%d" % v.refresh_at()
        parts.append("%s=%s" % (f, v))
    return " ".join(parts)


class Driver:
    """Feeds events, keeps the trace; no I/O."""

    def __init__(self, endpoints, discovery=False, token=False, prefix="dev", heartbeat=None):
        refresher = TokenRefresher(Backoff(1, 8), 10) if token else None
        self.sup = sv.Supervisor(endpoints, Backoff(1, 8), Topics(prefix), lambda: 0.5, refresher, discovery,
                                 heartbeat)
        self.trace = []

    def feed(self, event, now):
        actions = self.sup.handle(event, now)
        self.trace.append("@%s %s" % (now, _show(event)))
        for a in actions:
            self.trace.append("  " + _show(a))
        return actions

    @property
    def epoch(self):
        return self.sup.epoch


def failover():
    d = Driver([A, B])
    d.feed(sv.Event(sv.START), 0)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "refused"), 1)
    d.feed(sv.Event(sv.CONNECTED, d.epoch), 2)
    d.feed(sv.Event(sv.DISCONNECTED, d.epoch, "broker died"), 10)
    d.feed(sv.Event(sv.TICK), 10.2)  # before the short backoff ends: nothing
    d.feed(sv.Event(sv.TICK), 10.5)  # last good (b) again first
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "refused"), 11)
    return d.trace


def round_backoff():
    d = Driver([A, B])
    d.feed(sv.Event(sv.START), 0)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "a down"), 1)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.REFUSED, "b says no"), 2)
    d.feed(sv.Event(sv.TICK), 2.4)
    d.feed(sv.Event(sv.TICK), 2.5)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "a down"), 3)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "b down"), 4)  # second round: a longer ceiling
    return d.trace


def rediscovery():
    d = Driver([A], discovery=True)
    d.feed(sv.Event(sv.START), 0)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "a down"), 1)  # round failed: ask once
    d.feed(sv.Event(sv.DISCOVERED, [C, A]), 2)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "c down"), 3)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "a down"), 4)  # asked this round already: back off
    d.feed(sv.Event(sv.TICK), 5)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.TLS_VERIFY, "unknown CA"), 6)  # a new round may ask again
    d.feed(sv.Event(sv.DISCOVERED, None), 7)  # discovery failed: keep the list, go on with the round
    return d.trace


def discovery_first():
    d = Driver([], discovery=True)
    d.feed(sv.Event(sv.START), 0)
    d.feed(sv.Event(sv.DISCOVERED, None), 1)
    d.feed(sv.Event(sv.TICK), 1.5)
    d.feed(sv.Event(sv.DISCOVERED, [C]), 2)
    return d.trace


def renewal_proven():
    d = Driver([A, B])
    d.feed(sv.Event(sv.START), 0)
    d.feed(sv.Event(sv.CONNECTED, d.epoch), 1)
    d.feed(sv.Event(sv.RENEWAL_STAGED), 100)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "a went away"), 101)  # says nothing about the pair
    d.feed(sv.Event(sv.CONNECTED, d.epoch), 102)
    d.feed(sv.Event(sv.DISCONNECTED, d.epoch, "later drop"), 200)
    d.feed(sv.Event(sv.TICK), 201)  # the promoted pair is the current pair now: a plain Connect
    return d.trace


def renewal_disproven():
    d = Driver([A, B])
    d.feed(sv.Event(sv.START), 0)
    d.feed(sv.Event(sv.CONNECTED, d.epoch), 1)
    d.feed(sv.Event(sv.RENEWAL_STAGED), 100)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.REFUSED, "certificate unknown"), 101)
    d.feed(sv.Event(sv.CONNECTED, d.epoch), 102)  # the old pair still works
    return d.trace


def renewal_staged_while_offline():
    d = Driver([A])
    d.feed(sv.Event(sv.START), 0)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.UNREACHABLE, "a down"), 1)
    d.feed(sv.Event(sv.RENEWAL_STAGED), 1.2)
    d.feed(sv.Event(sv.TICK), 2)
    d.feed(sv.Event(sv.CONNECT_FAILED, d.epoch, sv.TLS_VERIFY, "broker CA unknown"), 3)  # about the broker, not us
    d.feed(sv.Event(sv.TICK), 4)
    return d.trace


def stale_events():
    d = Driver([A])
    d.feed(sv.Event(sv.START), 0)
    old = d.epoch
    d.feed(sv.Event(sv.CONNECTED, old), 1)
    d.feed(sv.Event(sv.ACKED, old, 1), 2)
    d.feed(sv.Event(sv.DISCONNECTED, old, "drop"), 3)
    d.feed(sv.Event(sv.ACKED, old, 2), 3.1)            # a late PUBACK of the closed session: dropped
    d.feed(sv.Event(sv.MESSAGE, old, "dev/s/ds", b"515,x"), 3.2)  # and its late message
    d.feed(sv.Event(sv.TICK), 4)
    d.feed(sv.Event(sv.CONNECTED, old), 4.1)          # a stale attempt: closed, not adopted
    d.feed(sv.Event(sv.CONNECTED, d.epoch), 5)
    d.feed(sv.Event(sv.ACKED, d.epoch, 1), 6)
    d.trace.append("dropped=%d" % d.sup.dropped)
    return d.trace


def messages():
    d = Driver([A])
    d.feed(sv.Event(sv.START), 0)
    d.feed(sv.Event(sv.CONNECTED, d.epoch), 1)
    d.feed(sv.Event(sv.MESSAGE, d.epoch, "dev/s/ds", b"515,a,b,1.0,http://x\n510,y"), 2)
    d.feed(sv.Event(sv.MESSAGE, d.epoch, "dev/s/ds", b"\xff\xfe"), 3)
    d.feed(sv.Event(sv.MESSAGE, d.epoch, "dev/other", b"hi"), 4)
    d.feed(sv.Event(sv.STOP), 5)
    d.feed(sv.Event(sv.TICK), 6)
    return d.trace


def token_schedule():
    d = Driver([A], token=True)
    d.feed(sv.Event(sv.START), 1000)
    d.feed(sv.Event(sv.CONNECTED, d.epoch), 1000)  # no token yet: asked at once
    d.feed(sv.Event(sv.MESSAGE, d.epoch, "dev/s/dat", ("71," + jwt(1000, 1100)).encode()), 1001)
    d.trace.append("deadline=%s" % d.sup.deadline())
    d.feed(sv.Event(sv.TICK), 1049)
    d.feed(sv.Event(sv.TICK), 1050)  # half life
    d.feed(sv.Event(sv.TICK), 1060)  # no answer within the 10 s timeout: retry after a backoff
    d.feed(sv.Event(sv.TICK), 1060.5)
    d.feed(sv.Event(sv.MESSAGE, d.epoch, "dev/s/dat", b"71,"), 1061)  # a 71 without a token: refused, retried
    d.feed(sv.Event(sv.MESSAGE, d.epoch, "dev/s/dat", b"41,not ours"), 1062)  # other templates: ignored
    d.feed(sv.Event(sv.TICK), 1062)
    d.feed(sv.Event(sv.MESSAGE, d.epoch, "dev/s/dat", ("71," + jwt(1062, 1162)).encode()), 1063)
    d.feed(sv.Event(sv.TOKEN_WANTED), 1064)  # a 401 elsewhere: ask now
    return d.trace


def heartbeat():
    # the firmware's heartbeat: a 117 line on s/us when the session comes up, then every interval
    d = Driver([A], token=True, heartbeat=90)
    d.feed(sv.Event(sv.START), 0)
    d.feed(sv.Event(sv.CONNECTED, d.epoch), 1)
    d.trace.append("deadline=%s" % d.sup.deadline())  # the token timeout comes first
    d.feed(sv.Event(sv.MESSAGE, d.epoch, "dev/s/dat", ("71," + jwt(1, 1001)).encode()), 2)
    d.trace.append("deadline=%s" % d.sup.deadline())
    d.feed(sv.Event(sv.TICK), 90)
    d.feed(sv.Event(sv.TICK), 91)
    d.feed(sv.Event(sv.DISCONNECTED, d.epoch, "drop"), 100)
    d.trace.append("deadline=%s" % d.sup.deadline())  # the reconnect, not the old session's heartbeat
    d.feed(sv.Event(sv.TICK), 181)
    return d.trace


def retry_decisions():
    out = []
    r = Retry(Backoff(10, 40), attempts=3)
    out.append(r.after(True, 100, 0.5))    # HTTP 503: again after a backoff
    out.append(r.after(True, 200, 0.5))
    out.append(r.after(True, 300, 0.5))
    out.append(r.after(True, 400, 0.5))    # out of attempts
    r.reset()
    out.append(r.after(False, 500, 0.5))   # a bad signature: never again
    forever = Retry(Backoff(10, 40))
    out.append([forever.after(True, 0, 0.99) for _ in range(5)][-1])
    return out


SCENARIOS = ("failover", "round_backoff", "rediscovery", "discovery_first", "renewal_proven",
             "renewal_disproven", "renewal_staged_while_offline", "stale_events", "messages", "token_schedule",
             "heartbeat", "retry_decisions")


def run_all():
    g = globals()
    return dict((name, g[name]()) for name in SCENARIOS)
