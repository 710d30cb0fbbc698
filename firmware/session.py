"""The board's MQTT session: a thin driver of the connection machine (agent/core/connection.py).

The machine decides: which endpoint next, when a failed round backs off, what a ``71`` line on
the token response topic means, when the token and the heartbeat are due. This module only does
what it asks over the wire: it opens a transport, frames MQTT (firmware/mqtt_codec.py), numbers
packets, keeps the connection alive (PINGREQ), and feeds back what happened as events of the
session's epoch (``Connected``, ``ConnectFailed(kind)``, ``Disconnected``, ``Message``, ``Acked``,
``Tick``). Missing a CONNACK, SUBACK, PUBACK or PINGRESP in time ends the session like a closed socket.

I/O is injected: ``connect(endpoint)`` returns a transport with ``send(bytes)``, ``recv(timeout)``
(bytes, or a view valid until the next call; ``b""`` when the peer closed; None when nothing
arrived in ``timeout`` seconds) and
``close()``, or raises OSError (``net.TransportError`` is one, typed by ``kind``); ``clock()``
returns seconds; ``wait(seconds)`` blocks while disconnected. Progress is reported through
``on_event(name, detail)`` (tether_main prints each as ``tether: <name> <detail>``):

- ``connecting`` Endpoint about to be tried; ``connect_failed`` (Endpoint, reason) of a failed
  attempt; ``round_failed`` the Rotation whose every endpoint failed; ``backoff`` seconds before
  the next attempt;
- ``connected`` Endpoint whose CONNACK accepted us; ``ready`` Endpoint, once the subscriptions
  are granted; ``disconnected`` why an established session ended;
- ``token_requested`` time the request went out; ``token`` TokenSchedule of the adopted token;
  ``token_error`` the supervisor's word on a refused answer or a request without one (the old
  token stays in use while valid);
- ``published`` packet id of an acknowledged QoS 1 publish; ``operation`` a SmartREST line from
  the downstream topic; ``message`` (topic, payload) on any other topic; ``problem`` anything
  else the supervisor reports.
"""

import mqtt_codec as mq

from agent.core import events as sv
from agent.core.connection import drive

DISCONNECTED = "disconnected"
CONNECTING = "connecting"    # CONNECT sent, waiting for CONNACK
SUBSCRIBING = "subscribing"  # accepted; waiting for the SUBACKs
READY = "ready"

# net.TransportError.kind -> ConnectFailed kind: a certificate that does not verify may mean a
# rotated CA, a TLS alert is the broker refusing us; resolve, connect, timeout, closed and memory
# say the endpoint is out of reach for now.
KINDS = {"verify": sv.TLS_VERIFY, "tls": sv.REFUSED}

TICK = sv.Event(sv.TICK)  # one instance: a timer firing allocates nothing


def _reason(exc):
    """``kind: detail`` for a TransportError, ``io: <repr>`` for any other OSError."""
    if getattr(exc, "kind", None):
        return str(exc)
    return "io: %r" % (exc,)


def _kind(exc):
    return KINDS.get(getattr(exc, "kind", None), sv.UNREACHABLE)


class Session:
    """Drives ``supervisor`` (an agent.core.connection.Connection) over MQTT; call ``step()`` in a loop."""

    def __init__(self, client_id, supervisor, connect, clock, wait, on_event=None, keepalive=60,
                 connect_timeout=10, ack_timeout=20, max_packet=mq.DEFAULT_MAX_PACKET):
        self.client_id = client_id
        self.sup = supervisor
        self._connect = connect
        self._clock = clock
        self._wait = wait
        self._on_event = on_event
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_packet = max_packet
        self.state = DISCONNECTED
        self.epoch = None      # the supervisor's epoch of the open transport
        self.endpoint = None
        self._started = False
        self._transport = None
        self._decoder = None
        self._deadline = None  # CONNACK or SUBACK due
        self._last_sent = 0
        self._ping_sent = None
        self._next_id = 0
        self._subs = []        # packet ids of SUBSCRIBEs without SUBACK
        self._inflight = {}    # packet id -> time sent
        # action type -> handler(action, now): drive() refuses an action without one. The actions
        # that only tell something share one handler (each handler is a function and a bound
        # method in a small heap).
        report = self._report
        self._perform = {
            sv.PUBLISH: self._publish, sv.SUBSCRIBE: self._subscribe, sv.CONNECT: self._open,
            sv.CLOSE: self._close, sv.SESSION_DOWN: self._session_down, sv.SESSION_UP: report,
            sv.ATTEMPT_FAILED: report, sv.BACKOFF: report, sv.WAIT_UNTIL: report, sv.TOKEN_ADOPTED: report,
            sv.DELIVERED: report, sv.PROBLEM: report, sv.OPERATION: report, sv.DELIVER: report,
        }

    # -- public API --------------------------------------------------------------------------

    def step(self):
        """Do one unit of work: start, wait for the supervisor's next timer or attempt while
        disconnected, else read once and run the timers."""
        now = self._clock()
        if self._transport is None:
            try:
                if self._started:
                    self._idle_step(now)
                else:
                    self._started = True
                    self._feed(sv.Event(sv.START), now)
            except MemoryError:
                pass  # the next step finds the attempt that never ran and reports it
            return
        try:
            self._connected_step(now)
        except OSError as exc:
            self._lost(_reason(exc), _kind(exc))
        except MemoryError:
            # A packet or TLS record that does not fit this heap: drop the connection (its buffers
            # go with it) and let the supervisor decide what next, rather than dying.
            self._lost("out of memory")

    def _idle_step(self, now):
        epoch = self.sup.attempting()
        if epoch is not None:
            # the supervisor asked for an attempt that a MemoryError stopped before it started
            self._feed(sv.Event(sv.CONNECT_FAILED, epoch, sv.UNREACHABLE, "memory: out of memory"), now)
            return
        at = self.sup.deadline()
        if at is not None and now < at:
            self._wait(at - now)
            return
        self._feed(TICK, now)

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
        return self.sup.token(self._clock())

    def close(self):
        """Stop the supervisor: DISCONNECT (best effort) and close the transport."""
        self._feed(sv.Event(sv.STOP), self._clock())
        self._drop()

    # -- feeding the supervisor --------------------------------------------------------------

    def _feed(self, event, now):
        """Hand ``event`` to the supervisor and perform its actions, and those of what they cause
        (``now`` is kept for every one: the board's clock is read once per step)."""
        drive(self.sup, event, lambda: now, self._perform)

    # -- performing actions: each returns the event it caused (a failed attempt or send), if any --

    def _publish(self, action, now):
        if self._transport is None or action.epoch != self.epoch:
            return None  # that session is gone; the supervisor hears it through its own event
        pid = self._packet_id() if action.qos else None
        if pid is not None:
            self._inflight[pid] = now
        if action.topic == self.sup.token_topic():
            self._emit("token_requested", now)
        return self._send_or_lose(mq.encode_publish(action.topic, action.payload, action.qos, pid))

    def _subscribe(self, action, now):
        if self._transport is None or action.epoch != self.epoch:
            return None
        pid = self._packet_id()  # a SUBSCRIBE always carries one (MQTT 3.1.1 3.8.2), whatever QoS it asks for
        self._subs.append(pid)
        return self._send_or_lose(mq.encode_subscribe(pid, [(action.topic, action.qos)]))

    def _close(self, action, now):
        if self._transport is not None and action.epoch == self.epoch:
            try:
                self._transport.send(mq.encode_disconnect())
            except OSError:
                pass  # closing anyway; the broker will notice the socket go
            self._drop()

    def _session_down(self, action, now):
        if action.epoch == self.epoch:
            self._drop()
        self._emit("disconnected", action.reason)

    def _report(self, action, now):
        """An action that only tells something, as the ``on_event`` the module docstring lists."""
        t = action.type
        if t == sv.ATTEMPT_FAILED:
            self._emit("connect_failed", (action.endpoint, action.reason))
        elif t == sv.BACKOFF:
            self._emit("round_failed", self.sup.round())
        elif t == sv.WAIT_UNTIL:
            self._emit("backoff", action.at - now)
        elif t == sv.TOKEN_ADOPTED:
            self._emit("token", action.schedule)
        elif t == sv.DELIVERED:
            self._emit("published", action.mid)
        elif t == sv.PROBLEM:
            self._emit("token_error" if action.what == "token" else "problem", action.detail)
        elif t == sv.OPERATION:
            self._emit("operation", action.line)
        elif t == sv.DELIVER:
            self._emit("message", (action.topic, action.payload))
        # SESSION_UP says nothing yet: "ready" follows the SUBACKs

    # -- the wire ------------------------------------------------------------------------------

    def _emit(self, name, detail=None):
        if self._on_event is not None:
            self._on_event(name, detail)

    def _packet_id(self):
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _send(self, data):
        self._transport.send(data)
        self._last_sent = self._clock()

    def _send_or_lose(self, data):
        """Send ``data``; on failure close the transport and return the event that says so."""
        try:
            self._send(data)
        except OSError as exc:
            return self._drop_event(_reason(exc), _kind(exc))
        except MemoryError:
            return self._drop_event("memory: send: out of memory")
        return None

    def _open(self, action, now):
        ep = action.endpoint
        self._emit("connecting", ep)
        try:
            transport = self._connect(ep)
        except OSError as exc:
            return sv.Event(sv.CONNECT_FAILED, action.epoch, _kind(exc), _reason(exc))
        except MemoryError:
            return sv.Event(sv.CONNECT_FAILED, action.epoch, sv.UNREACHABLE, "memory: connect: out of memory")
        self._transport = transport
        self.epoch = action.epoch
        self.endpoint = ep
        self._decoder = mq.Decoder(self.max_packet)
        self.state = CONNECTING
        self._deadline = now + self.connect_timeout
        # The first send also completes the TLS handshake (net.py), so verification failures
        # surface here.
        return self._send_or_lose(mq.encode_connect(self.client_id, self.keepalive, True))

    def _drop(self):
        if self._transport is not None:
            try:
                self._transport.close()
            except OSError:
                pass  # the socket is being discarded; nothing left to tell it
        self._transport = None
        self._decoder = None
        self._deadline = None
        self._inflight = {}
        self._subs = []
        self._ping_sent = None
        self.state = DISCONNECTED

    def _drop_event(self, reason, kind=sv.UNREACHABLE):
        """Close the transport; the event telling the supervisor (None if it was closed already)."""
        if self._transport is None:
            return None
        epoch = self.epoch
        accepted = self.state != CONNECTING
        self._drop()
        if accepted:
            return sv.Event(sv.DISCONNECTED, epoch, reason)
        return sv.Event(sv.CONNECT_FAILED, epoch, kind, reason)

    def _lost(self, reason, kind=sv.UNREACHABLE):
        event = self._drop_event(reason, kind)
        if event is not None:
            self._feed(event, self._clock())

    def _connected_step(self, now):
        data = self._transport.recv(max(0, self._next_deadline() - now))
        if data is not None:
            if not data:
                self._lost("connection closed by the broker", sv.REFUSED)
                return
            try:
                packets = self._decoder.feed(data)
            except mq.PacketError as exc:
                self._lost("bad data from the broker: %s" % exc, sv.REFUSED)
                return
            for p in packets:
                self._handle(p)
                if self._transport is None:
                    return
        self._timers(self._clock())

    def _handle(self, p):
        now = self._clock()
        if p.type == mq.CONNACK and self.state == CONNECTING:
            if p.return_code:
                self._lost("CONNACK refused: %s" % mq.connack_reason(p.return_code), sv.REFUSED)
                return
            self.state = SUBSCRIBING
            self._deadline = now + self.ack_timeout
            self._emit("connected", self.endpoint)
            self._feed(sv.Event(sv.CONNECTED, self.epoch), now)
        elif p.type == mq.SUBACK and p.packet_id in self._subs:
            if 0x80 in p.return_codes:
                self._lost("SUBSCRIBE refused (broker ACL?): return codes %r" % (p.return_codes,))
                return
            self._subs.remove(p.packet_id)
            if not self._subs and self.state == SUBSCRIBING:
                self.state = READY
                self._deadline = None
                self._emit("ready", self.endpoint)
        elif p.type == mq.PUBLISH:
            if p.qos == 1:
                self._send(mq.encode_puback(p.packet_id))
            self._feed(sv.Event(sv.MESSAGE, self.epoch, p.topic, p.payload), now)
        elif p.type == mq.PUBACK:
            if self._inflight.pop(p.packet_id, None) is not None:
                self._feed(sv.Event(sv.ACKED, self.epoch, p.packet_id), now)
        elif p.type == mq.PINGRESP:
            self._ping_sent = None
        else:
            self._lost("unexpected packet type %d in state %s" % (p.type, self.state), sv.REFUSED)

    def _next_deadline(self):
        times = [self._last_sent + self.keepalive]
        if self._deadline is not None:
            times.append(self._deadline)
        if self._ping_sent is not None:
            times.append(self._ping_sent + self.keepalive / 2)
        if self.state != CONNECTING:
            at = self.sup.deadline()
            if at is not None:
                times.append(at)
            for sent in self._inflight.values():
                times.append(sent + self.ack_timeout)
        return min(times)

    def _timers(self, now):
        if self._deadline is not None and now >= self._deadline:
            if self.state == CONNECTING:
                self._lost("no CONNACK within %s s" % self.connect_timeout)
            else:
                self._lost("no SUBACK within %s s" % self.ack_timeout)
            return
        if self._ping_sent is not None and now >= self._ping_sent + self.keepalive / 2:
            self._lost("no PINGRESP within %s s" % (self.keepalive / 2))
            return
        for sent in self._inflight.values():
            if now >= sent + self.ack_timeout:
                self._lost("no PUBACK within %s s" % self.ack_timeout)
                return
        if self.state != CONNECTING:
            at = self.sup.deadline()
            if at is not None and now >= at:
                self._feed(TICK, now)  # token request or timeout, heartbeat
                if self._transport is None:
                    return
        if self._ping_sent is None and now >= self._last_sent + self.keepalive:
            self._send(mq.encode_pingreq())
            self._ping_sent = now
