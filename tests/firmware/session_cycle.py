"""One full session cycle against FakeBroker, shared by the CPython and MicroPython tests.

connect (first endpoint refuses, so failover) -> subscribe -> token -> PUBLISH_COUNT QoS 1
publishes, then run on past half life to see the refresh. ``Cycle.advance()`` does one session
step and ``gc.collect()``, as firmware/main.py's loop does. Under MicroPython the peak of
``gc.mem_alloc()`` sampled on every transport call is reported relative to ``base`` (heap in use
after imports, before the session exists).
"""

import gc

from fake_broker import FakeBroker, FakeClock
from session import READY, Session

from agent.core.backoff import Backoff
from agent.core.endpoints import Rotation, parse_endpoint
from agent.core.token_schedule import TokenRefresher
from agent.core.topics import Topics

PUBLISH_COUNT = 100
LIFETIME = 3600


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
        rotation = Rotation([parse_endpoint("mqtts://core-a"), parse_endpoint("mqtts://core-b")])
        self.session = Session("d:dev1", Topics("dev1"), rotation, Backoff(1, 60),
                               TokenRefresher(Backoff(1, 60), 30), self.broker.connect, self.clock,
                               self.clock.wait, lambda: 0.5, self.on_event, keepalive=60,
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
