"""The device's MQTT session as an event-driven state machine with its I/O injected.

Cycle (DESIGN.md "Data flow"): pick the next endpoint from the Rotation, open a transport,
CONNECT, SUBSCRIBE to the token response and downstream topics, publish an empty message to the
token request topic, adopt the ``71`` token and ask again at half life, and publish a heartbeat.
On any failure the transport is closed and the next endpoint tried; after a whole round fails,
or after an established session drops, the next attempt waits a Backoff delay.

Everything the session decides comes from agent/core; this module only moves packets. It is fed
its I/O: ``connect(endpoint)`` returns a transport with ``send(bytes)``, ``recv(timeout)``
(bytes; ``b""`` when the peer closed; None when nothing arrived in ``timeout`` seconds) and
``close()``, or raises OSError (``net.TransportError`` is one, typed by ``kind``);
``clock()`` returns seconds; ``wait(seconds)`` blocks while
disconnected; ``rand()`` returns a float in [0, 1). Progress is reported through
``on_event(name, detail)``; see EVENTS.
"""

import mqtt_codec as mq

from agent.core import smartrest
from agent.core.errors import CoreError

DISCONNECTED = "disconnected"
CONNECTING = "connecting"
SUBSCRIBING = "subscribing"
READY = "ready"

# name -> detail passed to on_event
EVENTS = {
    "connecting": "Endpoint about to be tried",
    "connect_failed": "(Endpoint, reason) for a failed attempt",
    "backoff": "seconds before the next attempt",
    "round_failed": "Rotation whose every endpoint failed (caller may re-discover)",
    "connected": "Endpoint whose CONNACK accepted us",
    "ready": "Endpoint, once subscriptions are granted",
    "disconnected": "reason an established session ended",
    "token_requested": "time the request was published",
    "token": "TokenSchedule of the adopted token",
    "token_error": "CoreError: bad 71 line or no answer in time (old token kept)",
    "message": "(topic, payload) of any other PUBLISH",
    "published": "packet id of an acknowledged QoS 1 publish",
}


def _reason(exc):
    """``kind: detail`` for a TransportError, ``io: <repr>`` for any other OSError."""
    if getattr(exc, "kind", None):
        return str(exc)
    return "io: %r" % (exc,)


class Session:
    """One device's MQTT session; drive it by calling ``step()`` in a loop."""

    def __init__(self, client_id, topics, rotation, backoff, refresher, connect, clock, wait, rand,
                 on_event=None, keepalive=60, heartbeat_interval=60, heartbeat_payload=None,
                 connect_timeout=10, ack_timeout=20, max_packet=mq.DEFAULT_MAX_PACKET):
        self.client_id = client_id
        self.topics = topics
        self.rotation = rotation
        self.backoff = backoff
        self.refresher = refresher
        self._connect = connect
        self._clock = clock
        self._wait = wait
        self._rand = rand
        self._on_event = on_event
        self.keepalive = keepalive
        self.heartbeat_interval = heartbeat_interval
        # SmartREST 117 "set required availability interval" (minutes): idempotent, and any
        # upstream message marks the device available on the platform.
        if heartbeat_payload is None:
            heartbeat_payload = smartrest.format_line("117", max(1, heartbeat_interval * 2 // 60))
        self.heartbeat_payload = heartbeat_payload
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_packet = max_packet
        self.state = DISCONNECTED
        self.endpoint = None
        self._transport = None
        self._decoder = None
        self._retry_at = None
        self._deadline = None
        self._last_sent = 0
        self._ping_sent = None
        self._heartbeat_at = None
        self._next_id = 0
        self._sub_id = None
        self._inflight = {}  # packet id -> time sent

    # -- public API --------------------------------------------------------------------------

    def step(self):
        """Do one unit of work: wait or connect while disconnected, else read once and run timers."""
        now = self._clock()
        if self._transport is None:
            if self._retry_at is not None and now < self._retry_at:
                self._wait(self._retry_at - now)
                return
            self._retry_at = None
            self._open(now)
            return
        try:
            self._connected_step(now)
        except OSError as exc:
            self._lost(_reason(exc))
        except MemoryError:
            # A packet or TLS record that does not fit this heap: drop the connection (its buffers
            # go with it) and reconnect after a backoff rather than dying.
            self._lost("out of memory")

    def _connected_step(self, now):
        data = self._transport.recv(max(0, self._next_deadline() - now))
        if data is not None:
            if not data:
                self._lost("connection closed by the broker")
                return
            try:
                packets = self._decoder.feed(data)
            except mq.PacketError as exc:
                self._lost("bad data from the broker: %s" % exc)
                return
            for p in packets:
                self._handle(p)
                if self._transport is None:
                    return
        self._timers(self._clock())

    def publish(self, topic, payload, qos=1):
        """Publish on the open session; returns the packet id (None at QoS 0).

        Raises OSError when not ready, so callers can queue or drop.
        """
        if self.state != READY:
            raise OSError("session not ready (state %s)" % self.state)
        pid = None
        if qos:
            pid = self._packet_id()
            self._inflight[pid] = self._clock()
        self._send(mq.encode_publish(topic, payload, qos, pid))
        return pid

    def token(self):
        """The current access token if valid now, else None."""
        return self.refresher.token(self._clock())

    def close(self):
        """Send DISCONNECT (best effort) and close the transport."""
        if self._transport is not None and self.state != DISCONNECTED:
            try:
                self._transport.send(mq.encode_disconnect())
            except OSError:
                pass  # closing anyway; the broker will notice the socket go
        self._drop()

    # -- internals ---------------------------------------------------------------------------

    def _emit(self, name, detail=None):
        if self._on_event is not None:
            self._on_event(name, detail)

    def _packet_id(self):
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _send(self, data):
        self._transport.send(data)
        self._last_sent = self._clock()

    def _open(self, now):
        ep = self.rotation.next()
        self._emit("connecting", ep)
        try:
            transport = self._connect(ep)
        except OSError as exc:
            self._failed(ep, _reason(exc))
            return
        except MemoryError:
            self._failed(ep, "memory: connect: out of memory")
            return
        self._transport = transport
        self.endpoint = ep
        self._decoder = mq.Decoder(self.max_packet)
        self.state = CONNECTING
        self._deadline = now + self.connect_timeout
        self._ping_sent = None
        try:
            # The first send also completes the TLS handshake (net.py), so verification
            # failures surface here.
            self._send(mq.encode_connect(self.client_id, self.keepalive, True))
        except OSError as exc:
            self._failed(ep, _reason(exc))
        except MemoryError:
            self._failed(ep, "memory: send CONNECT: out of memory")

    def _drop(self):
        if self._transport is not None:
            try:
                self._transport.close()
            except OSError:
                pass  # the socket is being discarded; nothing left to tell it
        self._transport = None
        self._decoder = None
        self._inflight = {}
        self._ping_sent = None
        self.state = DISCONNECTED
        self.refresher.restart()

    def _schedule_retry(self):
        delay = self.backoff.next_delay(self._rand())
        self._retry_at = self._clock() + delay
        self._emit("backoff", delay)

    def _failed(self, ep, reason):
        """An attempt on ``ep`` failed before the session was ready."""
        self._drop()
        self.rotation.failed(ep)
        self._emit("connect_failed", (ep, reason))
        if self.rotation.round_failed():
            self._emit("round_failed", self.rotation)
            self.rotation.new_round()
            self._schedule_retry()

    def _lost(self, reason):
        if self.state != READY:
            self._failed(self.endpoint, reason)
            return
        self._drop()
        self._emit("disconnected", reason)
        # Backoff was reset by the CONNACK, so this is short; it stops a broker that accepts
        # and then drops us from turning the loop into a busy spin.
        self._schedule_retry()

    def _handle(self, p):
        now = self._clock()
        if p.type == mq.CONNACK and self.state == CONNECTING:
            if p.return_code:
                reason = mq.CONNACK_REASONS.get(p.return_code, "return code %d" % p.return_code)
                self._failed(self.endpoint, "CONNACK refused: %s" % reason)
                return
            self.rotation.succeeded(self.endpoint)
            self.backoff.reset()
            self._emit("connected", self.endpoint)
            self._sub_id = self._packet_id()
            self.state = SUBSCRIBING
            self._deadline = now + self.ack_timeout
            self._send(mq.encode_subscribe(self._sub_id, [(self.topics.token_response, 0),
                                                          (self.topics.downstream, 0)]))
        elif p.type == mq.SUBACK and self.state == SUBSCRIBING and p.packet_id == self._sub_id:
            if 0x80 in p.return_codes:
                self._lost("SUBSCRIBE refused (broker ACL?): return codes %r" % (p.return_codes,))
                return
            self.state = READY
            self._deadline = None
            self._heartbeat_at = now
            self._emit("ready", self.endpoint)
        elif p.type == mq.PUBLISH:
            if p.qos == 1:
                self._send(mq.encode_puback(p.packet_id))
            if p.topic == self.topics.token_response:
                self._token_lines(p.payload, now)
            else:
                self._emit("message", (p.topic, p.payload))
        elif p.type == mq.PUBACK:
            if self._inflight.pop(p.packet_id, None) is not None:
                self._emit("published", p.packet_id)
        elif p.type == mq.PINGRESP:
            self._ping_sent = None
        else:
            self._lost("unexpected packet type %d in state %s" % (p.type, self.state))

    def _token_lines(self, payload, now):
        try:
            lines = smartrest.split_lines(payload)
        except CoreError as exc:
            self._emit("token_error", exc)
            return
        for line in lines:
            # s/dat carries other templates too; only 71 is ours (issue 4).
            if smartrest.template_id(line) != "71":
                continue
            try:
                token = smartrest.parse_token(line)
            except CoreError as exc:
                self.refresher.rejected(exc, now, self._rand())
                self._emit("token_error", exc)
                continue
            try:
                schedule = self.refresher.received(token, now, self._rand())
            except CoreError as exc:  # the refresher already scheduled the retry
                self._emit("token_error", exc)
                continue
            self._emit("token", schedule)

    def _next_deadline(self):
        times = [self._last_sent + self.keepalive]
        if self._deadline is not None:
            times.append(self._deadline)
        if self._ping_sent is not None:
            times.append(self._ping_sent + self.keepalive / 2)
        if self.state == READY:
            times.append(self.refresher.next_event_at())
            times.append(self._heartbeat_at)
            for sent in self._inflight.values():
                times.append(sent + self.ack_timeout)
        return min(times)

    def _timers(self, now):
        if self._deadline is not None and now >= self._deadline:
            self._lost("no %s within %s s" % ("CONNACK" if self.state == CONNECTING else "SUBACK",
                                             self.connect_timeout if self.state == CONNECTING
                                             else self.ack_timeout))
            return
        if self._ping_sent is not None and now >= self._ping_sent + self.keepalive / 2:
            self._lost("no PINGRESP within %s s" % (self.keepalive / 2))
            return
        for sent in self._inflight.values():
            if now >= sent + self.ack_timeout:
                self._lost("no PUBACK within %s s" % self.ack_timeout)
                return
        if self.state == READY:
            if self.refresher.timed_out(now, self._rand()):
                self._emit("token_error", self.refresher.last_error)
            if self.refresher.due(now):
                self._send(mq.encode_publish(self.topics.token_request, b""))
                self.refresher.requested(now)
                self._emit("token_requested", now)
            if now >= self._heartbeat_at:
                self._heartbeat_at = now + self.heartbeat_interval
                self.publish(self.topics.upstream, self.heartbeat_payload, 1)
        if self._ping_sent is None and now >= self._last_sent + self.keepalive:
            self._send(mq.encode_pingreq())
            self._ping_sent = now
