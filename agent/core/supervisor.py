"""The connection supervisor: which endpoint to try, when, with which credentials, and what a
session does once it is up. A pure state machine shared by ``tether run`` and the firmware.

Shaped like h11 and ``provisioning/station/enrollment.py``: the driver feeds typed events with
the current time, ``handle(event, now)`` returns a list of actions, and the driver performs them
(opens sockets, writes files, sleeps). Nothing here reads a clock, touches the network or
starts a thread, so a test drives hours of failover in milliseconds with a fake clock.

Every session attempt gets a new ``epoch``; events about a session (``Connected``,
``ConnectFailed``, ``Disconnected``, ``Message``, ``Acked``) carry the epoch they belong to and
are dropped here, in one place, when it is not the current one: a late acknowledgement of a
closed session can never be mistaken for one of the next session, whose packet ids restart at 1.

Decisions generalised from the firmware's Session and the runtime (DESIGN.md "Endpoints",
"Data flow of one boot"):
- endpoints are tried in Rotation order; a whole failed round backs off (full jitter) and a new
  round starts; a round that fails, or a broker certificate that no longer verifies, asks for
  re-discovery at most once per round;
- a renewed certificate/key pair (``RenewalStaged``) is proven by the next session attempt
  (``ProveCandidate``); it is promoted only when that session is accepted (``Promote``), dropped
  when the broker refuses it (``Disprove``); an unreachable endpoint or an unverifiable broker
  says nothing about our pair, so the next endpoint proves it instead;
- the access token is requested on ``s/uat`` and read from ``71`` lines on ``s/dat`` through the
  TokenRefresher (refresh at half life, retry with backoff on a timeout or a bad answer);
- with ``heartbeat`` (seconds; the firmware sets it), a live session publishes a SmartREST ``117``
  ("required availability interval", twice the heartbeat in minutes) on ``s/us`` when it comes up
  and every ``heartbeat`` seconds after: any upstream message marks the device available.

Written in the CPython/MicroPython common subset (no typing, dataclasses or f-strings).
"""

from agent.core import smartrest
from agent.core.endpoints import Rotation
from agent.core.errors import CoreError, EndpointError, ParameterError
from agent.core.events import (
    KINDS,
    REFUSED,
    TLS_VERIFY,
    UNREACHABLE,
    Acked,
    AttemptFailed,
    Backoff,
    Close,
    Connect,
    Connected,
    ConnectFailed,
    Deliver,
    Delivered,
    Disconnected,
    Discovered,
    Disprove,
    Message,
    Operation,
    Problem,
    Promote,
    ProveCandidate,
    Publish,
    Rediscover,
    RenewalStaged,
    SessionDown,
    SessionUp,
    Start,
    Stop,
    Subscribe,
    Tick,
    TokenAdopted,
    TokenWanted,
    WaitUntil,
)
from agent.core.token_schedule import adopt_token_lines

# the vocabulary is re-exported: drivers write supervisor.Connect, supervisor.Tick, ...
__all__ = [
    "Supervisor", "KINDS", "REFUSED", "TLS_VERIFY", "UNREACHABLE", "Acked", "AttemptFailed", "Backoff",
    "Close", "Connect", "Connected", "ConnectFailed", "Deliver", "Delivered", "Disconnected", "Discovered",
    "Disprove", "Message", "Operation", "Problem", "Promote", "ProveCandidate", "Publish", "Rediscover",
    "RenewalStaged", "SessionDown", "SessionUp", "Start", "Stop", "Subscribe", "Tick", "TokenAdopted",
    "TokenWanted", "WaitUntil",
]

# Supervisor states
IDLE = "idle"
DISCOVERING = "discovering"
WAITING = "waiting"
CONNECTING = "connecting"
ONLINE = "online"
STOPPED = "stopped"


class Supervisor:
    """One device's connection brain. ``handle(event, now)`` -> list of actions.

    ``endpoints``: ordered list (last good first) to start with; may be empty when ``discovery``
    is True. ``backoff``: an agent.core.backoff.Backoff for failed rounds and dropped sessions.
    ``topics``: agent.core.topics.Topics. ``refresher``: a TokenRefresher, or None without tokens.
    ``rand()``: a float in [0, 1) for jitter. ``heartbeat``: seconds between heartbeats on a live
    session, or None. Raises EndpointError when no endpoint is known and discovery is off.
    """

    def __init__(self, endpoints, backoff, topics, rand, refresher=None, discovery=False, heartbeat=None):
        if not endpoints and not discovery:
            raise EndpointError("endpoints", "no endpoint to connect to (configure one or enable discovery)")
        self.backoff = backoff
        self.topics = topics
        self.refresher = refresher
        self.discovery = discovery
        self._rand = rand
        self.rotation = Rotation(endpoints) if endpoints else None
        self.state = IDLE
        self.epoch = 0
        self.endpoint = None
        self.candidate = None      # (chain, key) staged by renewal, until proven or disproven
        self.proving = False       # the current attempt uses the candidate
        self.retry_at = None
        self.rediscovered = False  # at most one re-discovery per round
        self.errors = {}           # endpoint url -> reason of its last failure
        self.dropped = 0           # stale events dropped (for tests and debugging)
        self.heartbeat = heartbeat
        self.heartbeat_at = None   # next heartbeat of the live session
        if heartbeat is not None:
            if not heartbeat > 0:
                raise ParameterError("heartbeat", "must be > 0 seconds, got %r" % (heartbeat,))
            self.heartbeat_payload = smartrest.format_line("117", max(1, int(heartbeat * 2 // 60)))

    # -- the one entry point ---------------------------------------------------------------------
    def handle(self, event, now):
        """Apply ``event`` at device time ``now``; return the actions to perform, in order."""
        out = []
        epoch = getattr(event, "epoch", None)
        if epoch is not None and epoch != self.epoch:
            self.dropped += 1
            if isinstance(event, Connected):
                out.append(Close(epoch))  # a stale attempt came up after all: it is nobody's session
            return out
        if self.state == STOPPED:
            return out
        name = type(event).__name__
        method = getattr(self, "_on_" + name, None)
        if method is None:
            raise CoreError("supervisor.event", "unknown event %s in state %s" % (name, self.state))
        method(event, now, out)
        return out

    def deadline(self):
        """Device time of the next timer (backoff end, token request or timeout), or None."""
        times = []
        if self.state == WAITING and self.retry_at is not None:
            times.append(self.retry_at)
        if self.state == ONLINE:
            if self.refresher is not None:
                times.append(self.refresher.next_event_at())
            if self.heartbeat_at is not None:
                times.append(self.heartbeat_at)
        return min(times) if times else None

    # -- events ------------------------------------------------------------------------------------
    def _on_Start(self, event, now, out):
        if self.rotation is None:
            self._rediscover("no known endpoint", out)
        else:
            self._attempt(now, out)

    def _on_Stop(self, event, now, out):
        if self.state in (CONNECTING, ONLINE):
            out.append(Close(self.epoch))
        if self.state == ONLINE:
            out.append(SessionDown(self.epoch, "stopping"))
        self.epoch += 1
        self.state = STOPPED

    def _on_Tick(self, event, now, out):
        if self.state == WAITING and self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            if self.rotation is None:
                self._rediscover("no known endpoint", out)
            else:
                self._attempt(now, out)
        elif self.state == ONLINE:
            if self.refresher is not None:
                self._token_timers(now, out)
            if self.heartbeat_at is not None and now >= self.heartbeat_at:
                self._heartbeat(now, out)

    def _on_ConnectFailed(self, event, now, out):
        if self.state != CONNECTING:
            return
        endpoint = self.endpoint
        self.errors[endpoint.url()] = event.reason
        out.append(AttemptFailed(endpoint, event.kind, event.reason))
        if self.proving and event.kind == REFUSED:
            # the broker refused the renewed pair: drop it and try the same endpoint with the old
            # pair at once (it worked before, so this is not a failed endpoint yet)
            self.candidate = None
            self.proving = False
            out.append(Disprove(event.reason))
            self._attempt(now, out, endpoint)
            return
        self.proving = False
        self.rotation.failed(endpoint)
        if self.discovery and not self.rediscovered and (event.kind == TLS_VERIFY or self.rotation.round_failed()):
            why = "a broker certificate no longer verifies" if event.kind == TLS_VERIFY else "every endpoint failed"
            self._rediscover(why, out)
            return
        self._next(now, out)

    def _on_Discovered(self, event, now, out):
        if self.state != DISCOVERING:
            return
        if event.endpoints:
            last_good = self.rotation.last_good if self.rotation is not None else None
            self.rotation = Rotation(event.endpoints)
            self.rotation.last_good = last_good
        elif self.rotation is None:
            out.append(Problem("discovery", "no endpoint known yet; asking again after a backoff"))
            self._wait(now, out, "discovery")
            return
        self._next(now, out)

    def _on_Connected(self, event, now, out):
        if self.state != CONNECTING:
            return
        endpoint = self.endpoint
        if self.proving:
            self.proving = False
            self.candidate = None
            out.append(Promote())
        self.rotation.succeeded(endpoint)
        self.backoff.reset()
        self.rediscovered = False
        self.errors.pop(endpoint.url(), None)
        self.state = ONLINE
        out.append(Subscribe(self.epoch, self.topics.downstream, 1))
        if self.refresher is not None:
            out.append(Subscribe(self.epoch, self.topics.token_response, 1))
            self.refresher.restart()
        out.append(SessionUp(self.epoch, endpoint))
        if self.refresher is not None:
            self._token_timers(now, out)
        if self.heartbeat is not None:
            self._heartbeat(now, out)

    def _on_Disconnected(self, event, now, out):
        if self.state == CONNECTING:  # closed before it was up: a failed attempt
            self._on_ConnectFailed(ConnectFailed(event.epoch, REFUSED, event.reason), now, out)
            return
        if self.state != ONLINE:
            return
        self._down(event.reason, out)
        # the CONNACK reset the backoff, so this is short; it keeps a broker that accepts and then
        # drops us from turning the loop into a busy spin
        self._wait(now, out, "session")

    def _on_Message(self, event, now, out):
        if self.state != ONLINE:
            return
        if self.refresher is not None and event.topic == self.topics.token_response:
            self._token_answer(event.payload, now, out)
        elif event.topic == self.topics.downstream:
            try:
                lines = smartrest.split_lines(event.payload)
            except CoreError as exc:
                out.append(Problem("operation", "ignoring a message on %s: %s" % (event.topic, exc)))
                return
            for line in lines:
                out.append(Operation(line))
        else:
            out.append(Deliver(event.topic, event.payload))

    def _on_Acked(self, event, now, out):
        if self.state == ONLINE:
            out.append(Delivered(event.mid))

    def _on_RenewalStaged(self, event, now, out):
        self.candidate = (event.chain, event.key)
        if self.state == ONLINE:
            out.append(Close(self.epoch))
            self._down("reconnecting to prove the renewed certificate", out)
            self._attempt(now, out)  # the rotation starts at the endpoint that just worked

    def _on_TokenWanted(self, event, now, out):
        if self.refresher is None:
            return
        if self.state == ONLINE and not self.refresher.pending():
            self._request_token(now, out)

    # -- helpers -----------------------------------------------------------------------------------
    def _attempt(self, now, out, endpoint=None):
        """Start the next attempt (on ``endpoint`` or the next in the rotation)."""
        self.epoch += 1
        self.endpoint = endpoint if endpoint is not None else self.rotation.next()
        self.state = CONNECTING
        if self.candidate is not None:
            self.proving = True
            out.append(ProveCandidate(self.epoch, self.endpoint, self.candidate[0], self.candidate[1]))
        else:
            self.proving = False
            out.append(Connect(self.epoch, self.endpoint))

    def _next(self, now, out):
        """After a failure: back off when the round failed, else try the next endpoint."""
        if self.rotation.round_failed():
            self._wait(now, out, "round")
            self.rotation.new_round()
            self.rediscovered = False
        else:
            self._attempt(now, out)

    def _wait(self, now, out, why):
        delay = self.backoff.next_delay(self._rand())
        self.retry_at = now + delay
        self.state = WAITING
        if why == "round":
            out.append(Backoff(self.retry_at, delay, len(self.rotation.endpoints)))
        out.append(WaitUntil(self.retry_at))

    def _rediscover(self, why, out):
        self.rediscovered = True
        self.state = DISCOVERING
        out.append(Rediscover(why))

    def _down(self, reason, out):
        out.append(SessionDown(self.epoch, reason))
        self.epoch += 1  # everything the old session still reports is stale from here
        self.state = IDLE
        self.heartbeat_at = None
        if self.refresher is not None:
            self.refresher.restart()

    def _heartbeat(self, now, out):
        out.append(Publish(self.epoch, self.topics.upstream, self.heartbeat_payload, 1))
        self.heartbeat_at = now + self.heartbeat

    def _request_token(self, now, out):
        out.append(Publish(self.epoch, self.topics.token_request, b"", 1))
        self.refresher.requested(now)

    def _token_timers(self, now, out):
        refresher = self.refresher
        if refresher.timed_out(now, self._rand()):
            out.append(Problem("token", "%s; asking again in %s (the current token stays in use while valid)"
                               % (_reason(refresher.last_error, "token"), _seconds(refresher.next_event_at() - now))))
        if refresher.due(now):
            self._request_token(now, out)

    def _token_answer(self, payload, now, out):
        for token, result in adopt_token_lines(self.refresher, payload, now, self._rand()):
            if token is None:
                out.append(Problem("token", "rejected an answer: %s; keeping the current token, asking again "
                                   "in %s" % (_reason(result, "token"),
                                              _seconds(self.refresher.next_event_at() - now))))
            else:
                out.append(TokenAdopted(token, result))


def _reason(error, what):
    """An error's text without a leading field that repeats ``what``: Problems are logged as
    ``what: detail``, and ``token: token: no response`` says the same thing twice."""
    if isinstance(error, CoreError) and error.field == what:
        return error.reason
    return str(error)


def _seconds(delay):
    """A delay as people read it in a log line (device clocks may be unset: never an epoch)."""
    return "%.1f s" % max(0.0, delay) if delay < 10 else "%d s" % round(delay)
