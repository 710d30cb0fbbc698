"""An in-memory broker and clock for driving firmware/session.py without sockets or sleeps.

Runs in CPython and MicroPython. The clock only moves when the session waits or reads with
nothing to read, so a whole session cycle, token refresh at half life included, runs instantly.
The broker answers CONNECT, SUBSCRIBE, PUBLISH (QoS 1: PUBACK; to the token request topic: a
``71`` line with a token issued "now") and PINGREQ, and delivers its replies in small chunks to
exercise partial reads.
"""

import mqtt_codec as mq
from vector_runner import make_jwt


class FakeClock:
    def __init__(self, start=1700000000):
        self.now = start

    def __call__(self):
        return self.now

    def wait(self, seconds):
        self.now += seconds


class FakeBroker:
    """Accepts connections via ``connect(endpoint)``; ``refuse`` lists hosts that fail to connect."""

    def __init__(self, clock, token_lifetime=3600, chunk=7, refuse=(), sample=None):
        self.clock = clock
        self.token_lifetime = token_lifetime
        self.chunk = chunk
        self.refuse = refuse
        self.sample = sample  # called on every transport operation (heap measurement)
        self.token_requests = []  # times the device asked
        self.published = []  # (topic, payload) from the device, except token requests
        self.connects = []
        self.token_payload = None  # override the 71 line (bad-token tests)
        self.token_answers = []  # answers to the next requests, in order, before token_payload

    def connect(self, endpoint):
        if endpoint.host in self.refuse:
            raise OSError(111, "connection refused")
        self.connects.append(endpoint.host)
        return FakeTransport(self)


class FakeTransport:
    def __init__(self, broker):
        self.broker = broker
        self.decoder = mq.Decoder()
        self.outgoing = bytearray()
        self.closed = False

    def send(self, data):
        b = self.broker
        if b.sample:
            b.sample()
        for p in self.decoder.feed(data):
            if p.type == mq.CONNECT:
                self.outgoing.extend(b"\x20\x02\x00\x00")
            elif p.type == mq.SUBSCRIBE:
                codes = bytearray()  # grant each filter the QoS it asked for
                at = 2
                while at < len(p.body):
                    n = (p.body[at] << 8) | p.body[at + 1]
                    codes.append(p.body[at + 2 + n])
                    at += 3 + n
                self.outgoing.extend(bytes([0x90, 2 + len(codes)]) + p.body[:2] + bytes(codes))
            elif p.type == mq.PUBLISH:
                if p.qos == 1:
                    self.outgoing.extend(mq.encode_puback(p.packet_id))
                if p.topic.endswith("s/uat"):
                    now = b.clock()
                    b.token_requests.append(now)
                    if b.token_answers:
                        line = b.token_answers.pop(0)
                    else:
                        line = b.token_payload or "71," + make_jwt({"iat": now, "exp": now + b.token_lifetime})
                    self.outgoing.extend(mq.encode_publish(p.topic[:-3] + "dat", line))
                else:
                    b.published.append((p.topic, p.payload))
            elif p.type == mq.PINGREQ:
                self.outgoing.extend(b"\xd0\x00")

    def recv(self, timeout):
        b = self.broker
        if b.sample:
            b.sample()
        if self.closed:
            return b""
        if not self.outgoing:
            b.clock.wait(timeout)
            return None
        data = bytes(self.outgoing[:b.chunk])
        self.outgoing = self.outgoing[b.chunk:]
        return data

    def close(self):
        self.closed = True
