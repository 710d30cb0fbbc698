"""The connection machine: which endpoint to try, when, and what a session does once it is up. Pure,
shared by ``tether run`` (through agent/core/supervisor.py, which adds discovery and renewal proof)
and the firmware (which runs this one as it is).

Shaped like h11's ``_state.py`` and ``agent/ota/machine.py``: the transitions are a table,
``TRANSITIONS``, one row per event type: the handler, the states it acts in, and the states in which
it is ignored on purpose (each with its reason below). Any other (state, event) pair raises a
CoreError naming both: a driver bug surfaces where it happens instead of leaving the machine in a
state nobody planned. The driver feeds events (agent.core.events.Event; ``event.type`` picks the
row) with the current time through ``drive()``, which performs the actions ``handle(event, now)``
returns. Nothing here reads a clock, touches the network or starts a thread, so a test drives hours
of failover in milliseconds with a fake clock.

Every session attempt gets a new ``epoch``; events about a session (``Connected``,
``ConnectFailed``, ``Disconnected``, ``Message``, ``Acked``) carry the epoch they belong to and
are dropped here, in one place, when it is not the current one: a late acknowledgement of a
closed session can never be mistaken for one of the next session, whose packet ids restart at 1.

Decisions (DESIGN.md "Endpoints", "Data flow of one boot"):
- endpoints are tried in Rotation order; a whole failed round backs off (full jitter) and a new
  round starts;
- the access token is requested on ``s/uat`` and read from ``71`` lines on ``s/dat`` through the
  TokenRefresher (refresh at half life, retry with backoff on a timeout or a bad answer);
- with ``heartbeat`` (seconds; the firmware sets it), a live session publishes a SmartREST ``117``
  ("required availability interval", twice the heartbeat in minutes) on ``s/us`` when it comes up
  and every ``heartbeat`` seconds after: any upstream message marks the device available.

Drivers ask questions (``deadline()``, ``attempting()``, ``token_topic()``, ``token(now)``, ``round()``;
the supervisor adds the Linux agent's) and never read or write the machine's fields.

Written in the CPython/MicroPython common subset (no typing, dataclasses or f-strings).
"""

from agent.core import events as ev
from agent.core import smartrest
from agent.core.endpoints import Rotation
from agent.core.errors import CoreError, ParameterError
from agent.core.events import REFUSED, Event
from agent.core.token_schedule import adopt_token_lines

# A session is clean (the agent and the firmware connect with clean session / no session expiry): what
# the broker holds for it, unacknowledged messages included, dies with the connection, so a QoS 1
# subscription gives the device nothing QoS 0 does not. It costs on a cluster: RabbitMQ 3.10 keeps a QoS 1
# subscription in a durable queue on one node, which refuses the device on every other node once that
# node dies (docs/device.md "Brokers").
SUBSCRIBE_QOS = 0

# States
IDLE = "idle"
DISCOVERING = "discovering"  # agent/core/supervisor.py only
WAITING = "waiting"
CONNECTING = "connecting"
ONLINE = "online"
STOPPED = "stopped"


def drive(machine, event, now, perform):
    """Hand ``event`` to ``machine`` and perform what it asks, until nothing follows. The one feed
    loop of every driver (the agent's runtime, ``tether check``, the firmware's session).

    ``now()`` is the device clock, read once per event handed to the machine, so an event that
    follows a slow action (a connection attempt) is dated when it happened. ``perform`` maps each
    action type the machine can return (its ``ACTIONS``, ``action.type``) to ``handler(action,
    now)``, which returns the event the action caused (a connection attempt's outcome, a discovery
    answer) or None. Events are handled in the order they were caused. Raises CoreError for an action with no handler.
    """
    pending = [event]
    while pending:
        at = now()
        for action in machine.handle(pending.pop(0), at):
            handler = perform.get(action.type)
            if handler is None:
                raise CoreError("drive", "no handler for the action %s" % action.name())
            follow = handler(action, at)
            if follow is not None:
                pending.append(follow)


class Connection:
    """One device's connection brain. ``handle(event, now)`` -> list of actions.

    ``endpoints``: ordered list (last good first). ``backoff``: an agent.core.backoff.Backoff for
    failed rounds and dropped sessions. ``topics``: agent.core.topics.Topics. ``rand()``: a float in
    [0, 1) for jitter. ``refresher``: a TokenRefresher, or None without tokens. ``heartbeat``:
    seconds between heartbeats on a live session, or None. Raises EndpointError when no endpoint is
    given, ParameterError for a heartbeat that is not positive.
    """

    def __init__(self, endpoints, backoff, topics, rand, refresher=None, heartbeat=None):
        self.backoff = backoff
        self.topics = topics
        self.refresher = refresher
        self._rand = rand
        self.rotation = Rotation(endpoints) if endpoints or not self.discovery else None
        self.state = IDLE
        self.epoch = 0
        self.endpoint = None
        self.retry_at = None
        self.errors = {}           # endpoint url -> reason of its last failure
        self.dropped = 0           # stale events dropped (for tests and debugging)
        self.heartbeat = heartbeat
        self.heartbeat_at = None   # next heartbeat of the live session
        if heartbeat is not None:
            if not heartbeat > 0:
                raise ParameterError("heartbeat", "must be > 0 seconds, got %r" % (heartbeat,))
            self.heartbeat_payload = smartrest.format_line("117", max(1, int(heartbeat * 2 // 60)))

    discovery = False  # agent/core/supervisor.py's machine can ask for endpoints

    # -- the one entry point ---------------------------------------------------------------------
    def handle(self, event, now):
        """Apply ``event`` at device time ``now``; return the actions to perform, in order. Raises
        CoreError for an event type the machine does not know or a (state, event) pair it does not
        expect."""
        out = []
        epoch = getattr(event, "epoch", None)
        if epoch is not None and epoch != self.epoch:
            self.dropped += 1
            if event.type == ev.CONNECTED:
                out.append(Event(ev.CLOSE, epoch))  # a stale attempt came up after all: it is nobody's session
            return out
        row = self.TRANSITIONS.get(event.type)
        if row is None:
            raise CoreError("supervisor.event", "unknown event %s in state %s" % (event.name(), self.state))
        if self.state in row[1]:
            row[0](self, event, now, out)
        elif self.state not in row[2]:
            raise CoreError("supervisor.transition", "event %s is not expected in state %s"
                            % (event.name(), self.state))
        return out

    # -- questions drivers ask ---------------------------------------------------------------------
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

    def attempting(self):
        """The epoch of the connection attempt the machine waits to hear about, or None."""
        return self.epoch if self.state == CONNECTING else None

    def token_topic(self):
        """The topic token requests are published on."""
        return self.topics.token_request

    def token(self, now):
        """The current access token if valid at ``now``, else None (also None without tokens)."""
        return self.refresher.token(now) if self.refresher is not None else None

    def round(self):
        """The Rotation of this round (its ``endpoints``, in the order they are tried)."""
        return self.rotation

    # -- transitions -------------------------------------------------------------------------------
    def _start(self, event, now, out):
        self._begin(now, out)

    def _stop(self, event, now, out):
        if self.state in (CONNECTING, ONLINE):
            out.append(Event(ev.CLOSE, self.epoch))
        if self.state == ONLINE:
            out.append(Event(ev.SESSION_DOWN, self.epoch, "stopping"))
        self.epoch += 1
        self.state = STOPPED

    def _tick(self, event, now, out):
        if self.state == WAITING:
            if self.retry_at is not None and now >= self.retry_at:
                self.retry_at = None
                self._begin(now, out)
            return
        if self.refresher is not None:
            self._token_timers(now, out)
        if self.heartbeat_at is not None and now >= self.heartbeat_at:
            self._heartbeat(now, out)

    def _connect_failed(self, event, now, out):
        endpoint = self.endpoint
        self.errors[endpoint.url()] = event.reason
        out.append(Event(ev.ATTEMPT_FAILED, endpoint, event.kind, event.reason))
        if self._candidate_refused(event, now, out):
            return
        self.rotation.failed(endpoint)
        if self._rediscover_after(event, out):
            return
        self._next(now, out)

    def _connected(self, event, now, out):
        endpoint = self.endpoint
        self._accepted(out)
        self.rotation.succeeded(endpoint)
        self.backoff.reset()
        self.errors.pop(endpoint.url(), None)
        self.state = ONLINE
        out.append(Event(ev.SUBSCRIBE, self.epoch, self.topics.downstream, SUBSCRIBE_QOS))
        if self.refresher is not None:
            out.append(Event(ev.SUBSCRIBE, self.epoch, self.topics.token_response, SUBSCRIBE_QOS))
            self.refresher.restart()
        out.append(Event(ev.SESSION_UP, self.epoch, endpoint))
        if self.refresher is not None:
            self._token_timers(now, out)
        if self.heartbeat is not None:
            self._heartbeat(now, out)

    def _disconnected(self, event, now, out):
        if self.state == CONNECTING:  # closed before it was up: a failed attempt
            self._connect_failed(Event(ev.CONNECT_FAILED, event.epoch, REFUSED, event.reason), now, out)
            return
        self._down(event.reason, out)
        # the CONNACK reset the backoff, so this is short; it keeps a broker that accepts and then
        # drops us from turning the loop into a busy spin
        self._wait(now, out, "session")

    def _message(self, event, now, out):
        if self.refresher is not None and event.topic == self.topics.token_response:
            self._token_answer(event.payload, now, out)
        elif event.topic == self.topics.downstream:
            try:
                lines = smartrest.split_lines(event.payload)
            except CoreError as exc:
                out.append(Event(ev.PROBLEM, "operation", "ignoring a message on %s: %s" % (event.topic, exc)))
                return
            for line in lines:
                out.append(Event(ev.OPERATION, line))
        else:
            out.append(Event(ev.DELIVER, event.topic, event.payload))

    def _acked(self, event, now, out):
        out.append(Event(ev.DELIVERED, event.mid))

    def _token_wanted(self, event, now, out):
        if self.refresher is not None and not self.refresher.pending():
            self._request_token(now, out)

    # event type -> (handler, states it acts in, states where it is ignored on purpose). Why the
    # ignored pairs are harmless:
    # - STOPPED: the machine is done; whatever still arrives (a worker's late answer) goes nowhere.
    # - Tick outside WAITING/ONLINE: no timer of the machine runs there (drivers tick on their own).
    # - ConnectFailed, Connected, Disconnected of the current epoch after the attempt was decided
    #   (WAITING, IDLE): the runtime's network thread may report the end of an attempt that
    #   already failed; a Connected there cannot happen and raises.
    # - Message, Acked, TokenWanted without a live session: a consumer's 401 or a late packet of
    #   this epoch while the next attempt is prepared; there is nothing to do with them.
    TRANSITIONS = {  # type: dict
        ev.START: (_start, (IDLE,), (STOPPED,)),
        ev.STOP: (_stop, (IDLE, WAITING, CONNECTING, ONLINE), (STOPPED,)),
        ev.TICK: (_tick, (WAITING, ONLINE), (IDLE, CONNECTING, STOPPED)),
        ev.CONNECT_FAILED: (_connect_failed, (CONNECTING,), (IDLE, WAITING, ONLINE, STOPPED)),
        ev.CONNECTED: (_connected, (CONNECTING,), (STOPPED,)),
        ev.DISCONNECTED: (_disconnected, (CONNECTING, ONLINE), (IDLE, WAITING, STOPPED)),
        ev.MESSAGE: (_message, (ONLINE,), (IDLE, WAITING, CONNECTING, STOPPED)),
        ev.ACKED: (_acked, (ONLINE,), (IDLE, WAITING, CONNECTING, STOPPED)),
        ev.TOKEN_WANTED: (_token_wanted, (ONLINE,), (IDLE, WAITING, CONNECTING, STOPPED)),
    }
    # what handle() can return: every driver's ``perform`` has a handler for each (a test checks)
    ACTIONS = (  # type: tuple
        ev.CONNECT, ev.CLOSE, ev.WAIT_UNTIL, ev.SUBSCRIBE, ev.PUBLISH, ev.SESSION_UP, ev.SESSION_DOWN,
        ev.ATTEMPT_FAILED, ev.BACKOFF, ev.OPERATION, ev.DELIVER, ev.DELIVERED, ev.TOKEN_ADOPTED, ev.PROBLEM)

    # -- hooks the supervisor fills in (discovery, renewal proof) ----------------------------------
    def _begin(self, now, out):
        """Start connecting (the supervisor asks discovery first when no endpoint is known)."""
        self._attempt(now, out)

    # A board runs the Connection alone, where the hooks do nothing; one function serves the four
    # that do nothing here (on a ROMFS board each function costs heap even never called).
    def _no_hook(self, *args):
        """False: not handled here (the supervisor's ``_candidate_refused`` handles a refused renewed
        pair, ``_rediscover_after`` asks discovery again; its ``_accepted`` promotes a proven pair
        when a session is accepted, its ``_round_over`` re-arms re-discovery after a failed round)."""
        return False

    _candidate_refused = _rediscover_after = _accepted = _round_over = _no_hook

    def _connect_action(self):
        """The action that opens the attempt of the current epoch to ``self.endpoint``."""
        return Event(ev.CONNECT, self.epoch, self.endpoint)

    # -- helpers -----------------------------------------------------------------------------------
    def _attempt(self, now, out, endpoint=None):
        """Start the next attempt (on ``endpoint`` or the next in the rotation)."""
        self.epoch += 1
        self.endpoint = endpoint if endpoint is not None else self.rotation.next()
        self.state = CONNECTING
        out.append(self._connect_action())

    def _next(self, now, out):
        """After a failure: back off when the round failed, else try the next endpoint."""
        if self.rotation.round_failed():
            self._wait(now, out, "round")
            self.rotation.new_round()
            self._round_over()
        else:
            self._attempt(now, out)

    def _wait(self, now, out, why):
        delay = self.backoff.next_delay(self._rand())
        self.retry_at = now + delay
        self.state = WAITING
        if why == "round":
            out.append(Event(ev.BACKOFF, self.retry_at, delay, len(self.rotation.endpoints)))
        out.append(Event(ev.WAIT_UNTIL, self.retry_at))

    def _down(self, reason, out):
        out.append(Event(ev.SESSION_DOWN, self.epoch, reason))
        self.epoch += 1  # everything the old session still reports is stale from here
        self.state = IDLE
        self.heartbeat_at = None
        if self.refresher is not None:
            self.refresher.restart()

    def _heartbeat(self, now, out):
        out.append(Event(ev.PUBLISH, self.epoch, self.topics.upstream, self.heartbeat_payload, 1))
        self.heartbeat_at = now + self.heartbeat

    def _request_token(self, now, out):
        out.append(Event(ev.PUBLISH, self.epoch, self.topics.token_request, b"", 1))
        self.refresher.requested(now)

    def _token_timers(self, now, out):
        refresher = self.refresher
        if refresher.timed_out(now, self._rand()):
            out.append(Event(ev.PROBLEM, "token", "%s; asking again in %s (the current token stays in use while valid)"
                               % (_reason(refresher.last_error, "token"), _seconds(refresher.next_event_at() - now))))
        if refresher.due(now):
            self._request_token(now, out)

    def _token_answer(self, payload, now, out):
        for token, result in adopt_token_lines(self.refresher, payload, now, self._rand()):
            if token is None:
                out.append(Event(ev.PROBLEM, "token", "rejected an answer: %s; keeping the current token, asking again "
                                   "in %s" % (_reason(result, "token"),
                                              _seconds(self.refresher.next_event_at() - now))))
            else:
                out.append(Event(ev.TOKEN_ADOPTED, token, result))


def _reason(error, what):
    """An error's text without a leading field that repeats ``what``: Problems are logged as
    ``what: detail``, and ``token: token: no response`` says the same thing twice."""
    if isinstance(error, CoreError) and error.field == what:
        return error.reason
    return str(error)


def _seconds(delay):
    """A delay as people read it in a log line (device clocks may be unset: never an epoch)."""
    return "%.1f s" % max(0.0, delay) if delay < 10 else "%d s" % round(delay)
