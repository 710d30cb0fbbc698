"""One full session cycle against FakeBroker, shared by the CPython and MicroPython tests.

connect (first endpoint refuses, so failover) -> subscribe -> token -> PUBLISH_COUNT QoS 1
publishes, then run on past half life to see the refresh. ``Cycle.advance()`` does one session
step and ``gc.collect()``, as firmware/main.py's loop does. Under MicroPython the peak of
``gc.mem_alloc()`` sampled on every transport call is reported relative to ``base`` (heap in use
after imports, before the session exists).
"""

import gc

import board_config
import board_setup
from fake_broker import FakeBroker, FakeClock
from session import READY

PUBLISH_COUNT = 100
LIFETIME = 3600


def board(connect, clock, on_event, rand=None, **settings):
    """The Session board_setup builds for a tether.json with ``settings`` (board_config.DEFAULTS
    for the rest; device ``dev1``, client id ``d:dev1``, topics under ``dev1``)."""
    config = dict(board_config.DEFAULTS)
    config.update({"device_id": "dev1", "endpoints": ["mqtts://core-b"], "client_id_prefix": "d:"})
    config.update(settings)
    return board_setup.build_session(config, board_config.endpoints(config), connect, clock, clock.wait,
                                     rand or (lambda: 0.5), on_event)


class Cycle:
    def __init__(self, base=0):
        self.has_heap = hasattr(gc, "mem_alloc")
        self.base = base
        self.peak = 0
        self.clock = FakeClock()
        self.broker = FakeBroker(self.clock, token_lifetime=LIFETIME, refuse=("core-a",), sample=self.sample)
        self.events = []
        self.acked = 0
        self.sent = 0
        self.steps = 0
        self.session = board(self.broker.connect, self.clock, self.on_event,
                             endpoints=["mqtts://core-a", "mqtts://core-b"], token_timeout=30,
                             heartbeat_interval=600)
        self.start = self.clock()

    def sample(self):
        if self.has_heap:
            used = gc.mem_alloc()
            if used > self.peak:
                self.peak = used

    def on_event(self, name, detail):
        if name == "published":
            self.acked += 1
        elif name != "token_requested" and len(self.events) < 8:
            self.events.append(name)

    def advance(self):
        """One step; True once 100 publishes are acked and the half-life refresh was requested."""
        s = self.session
        s.step()
        self.steps += 1
        if s.state == READY and self.sent < PUBLISH_COUNT and s.token() is not None:
            s.publish("dev1/s/us", "200,c8y_Temperature,T," + str(self.sent))
            self.sent += 1
        if self.steps > 20000 or self.clock() > self.start + LIFETIME:
            raise AssertionError(f"session made no progress: {self.events!r}")
        gc.collect()
        return self.acked >= PUBLISH_COUNT + 1 and len(self.broker.token_requests) >= 2

    def result(self):
        self.session.close()
        b = self.broker
        return {
            "connects": b.connects,
            "events": self.events,
            "acked": self.acked,
            "token_requests": b.token_requests,
            "heap_base": self.base,
            "heap_peak": self.peak,
            "heap_peak_over_base": self.peak - self.base if self.has_heap else 0,
        }


def run_cycle():
    """Run a whole cycle in one call (CPython; MicroPython tests drive ``advance`` from node)."""
    cycle = Cycle()
    while not cycle.advance():
        pass
    return cycle.result()


# Answers to the board's token requests: not UTF-8, a 71 without a token, a token that is not a
# JWT, one that expired before it arrived (no iat), then a good one.
BAD_ANSWERS = (b"\xff\xfe", "71,", "71,not-a-jwt", "EXPIRED")


def _token_trace(trace, name, detail):
    if name == "token_requested":
        trace.append(f"request@{detail}")
    elif name == "token_error":
        trace.append(f"refused: {detail}")
    elif name == "token":
        trace.append(f"adopted: refresh@{detail.refresh_at()}")


def token_answers():
    """The same token answers read by the board and by a bare supervisor fed them at the times the
    board asked. Returns ``{"board": [...], "supervisor": [...]}``; the two must be equal, which
    they are only while the board leaves the ``71`` handling (and its retry timing) to agent/core."""
    from vector_runner import make_jwt

    from agent.core import supervisor as sv
    from agent.core.backoff import Backoff
    from agent.core.token_schedule import TokenRefresher

    clock = FakeClock()
    broker = FakeBroker(clock)
    answers = [a if a != "EXPIRED" else "71," + make_jwt({"exp": clock() - 10}) for a in BAD_ANSWERS]
    broker.token_answers = list(answers)
    board_trace = []
    s = board(broker.connect, clock, lambda name, detail: _token_trace(board_trace, name, detail),
              heartbeat_interval=3600)
    while not board_trace or not board_trace[-1].startswith("adopted"):
        s.step()
        if len(broker.token_requests) > len(answers) + 1:
            raise AssertionError(f"no token adopted: {board_trace!r}")
    s.close()

    # the supervisor alone, fed the same answers at the times the board's requests went out
    d = board_config.DEFAULTS
    sup = sv.Supervisor([s.endpoint], Backoff(d["backoff_base"], d["backoff_cap"]), s.sup.topics, lambda: 0.5,
                        TokenRefresher(Backoff(d["backoff_base"], d["backoff_cap"]), d["token_timeout"]))
    trace = []
    times = broker.token_requests
    sup.handle(sv.Event(sv.START), times[0])
    first = True
    for i, at in enumerate(times):
        actions = sup.handle(sv.Event(sv.CONNECTED, sup.epoch), at) if first else sup.handle(sv.Event(sv.TICK), at)
        first = False
        payload = answers[i] if i < len(answers) else None
        if payload is None:
            payload = "71," + make_jwt({"iat": at, "exp": at + broker.token_lifetime})
        actions = actions + sup.handle(sv.Event(sv.MESSAGE, sup.epoch, sup.topics.token_response,
                                                  payload if isinstance(payload, bytes) else payload.encode()), at)
        for a in actions:
            if a.type == sv.PUBLISH and a.topic == sup.topics.token_request:
                _token_trace(trace, "token_requested", at)
            elif a.type == sv.PROBLEM:
                _token_trace(trace, "token_error", a.detail)
            elif a.type == sv.TOKEN_ADOPTED:
                _token_trace(trace, "token", a.schedule)
    return {"board": board_trace, "supervisor": trace}
