"""When to ask for a new access token, and what to do when the answer does not come.

DESIGN.md "Data flow": refresh at ``iat + (exp - iat) / 2``. The claims are on the issuer's
clock and ``now`` is on the device's; the two agree on a Linux box with NTP and can be decades
apart on a board that booted without a real-time clock. So the schedule is built on the issuer's
timeline when the device clock agrees with ``iat`` within ``max_skew``, and otherwise on the
device's own timeline starting at the moment the token was received. All times are seconds
(int or float) on the device clock, passed in by the caller.
"""

from agent.core import smartrest
from agent.core.errors import CoreError, ParameterError, TokenError
from agent.core.jwt import check_lifetime, decode_claims

DEFAULT_MAX_SKEW_S = 300


class TokenSchedule:
    """Refresh and expiry times of one token, mapped onto the device clock.

    ``claims`` is what ``decode_claims`` returned; ``received_at`` is the device time the token
    arrived. Without ``iat`` the lifetime is ``exp - received_at``, which must itself be a sane
    lifetime (1 s .. 365 days) or TokenError is raised: a device whose clock is that far off
    cannot tell when an ``iat``-less token expires.
    """

    def __init__(self, claims, received_at, max_skew=DEFAULT_MAX_SKEW_S):
        exp = claims["exp"]
        iat = claims.get("iat")
        self.received_at = received_at
        if iat is None:
            self.skew = None
            self.lifetime = exp - received_at
            check_lifetime(self.lifetime, "claims.exp (no iat, measured from receipt)")
            self._issued = received_at
        else:
            self.skew = received_at - iat
            self.lifetime = exp - iat
            # A token received long after iat on an agreeing clock is simply old: keep the
            # issuer's timeline so it is refreshed (at once if need be), not given a new life.
            self._issued = iat if -max_skew <= self.skew <= max_skew else received_at

    def refresh_at(self):
        """Device time at which to ask for the next token: half way through its life."""
        return self._issued + self.lifetime / 2

    def expires_at(self):
        """Device time after which the token must not be used."""
        return self._issued + self.lifetime

    def delay(self, now):
        """Seconds from ``now`` until the refresh is due; 0 when past half life or expired."""
        return max(0, self.refresh_at() - now)

    def valid(self, now):
        """True while the token may still be presented at ``now``."""
        return now < self.expires_at()


class TokenRefresher:
    """The token request cycle as a state object: decides, the caller sends and receives.

    Cycle: ``due(now)`` says a request should go out; the caller publishes it and calls
    ``requested(now)``. Then either ``received(token, now, rand)`` (a ``71`` line arrived) or,
    when ``now`` passes ``requested + timeout``, ``timed_out(now, rand)`` returns True. Failures
    (timeout, bad token) schedule a retry through ``backoff`` and keep the previous token while it
    is valid; ``token(now)`` is what to present. ``rand`` is a float in [0, 1) for the jitter.
    """

    def __init__(self, backoff, timeout, max_skew=DEFAULT_MAX_SKEW_S):
        if not timeout > 0:
            raise ParameterError("token.timeout", "must be > 0, got %r" % (timeout,))
        self.backoff = backoff
        self.timeout = timeout
        self.max_skew = max_skew
        self.schedule = None
        self._token = None
        self._pending_since = None
        self._retry_at = None
        self.last_error = None

    def token(self, now):
        """The current token if it is still valid at ``now``, else None."""
        if self._token is not None and self.schedule.valid(now):
            return self._token
        return None

    def pending(self):
        """True between ``requested`` and the answer or timeout."""
        return self._pending_since is not None

    def due(self, now):
        """True when a request should be sent at ``now``."""
        if self._pending_since is not None:
            return False
        if self._retry_at is not None:
            return now >= self._retry_at
        if self.schedule is None:
            return True
        return now >= self.schedule.refresh_at()

    def next_event_at(self):
        """Device time of the next thing to act on (request, retry or timeout check)."""
        if self._pending_since is not None:
            return self._pending_since + self.timeout
        if self._retry_at is not None:
            return self._retry_at
        if self.schedule is None:
            return 0
        return self.schedule.refresh_at()

    def requested(self, now):
        """Record that a request went out at ``now``."""
        self._pending_since = now
        self._retry_at = None

    def restart(self):
        """Forget an in-flight request (the connection dropped); ask again as soon as due."""
        self._pending_since = None
        self._retry_at = None

    def timed_out(self, now, rand):
        """If the pending request has had no answer by ``now``, schedule a retry and return True."""
        if self._pending_since is None or now < self._pending_since + self.timeout:
            return False
        self._fail(now, rand, TokenError("token", "no response within %s s" % (self.timeout,)))
        return True

    def received(self, token, now, rand):
        """Adopt ``token`` received at ``now`` and return its TokenSchedule.

        A bad token raises TokenError after scheduling a retry with backoff; the previous token
        stays in use while valid.
        """
        try:
            claims = decode_claims(token)
            schedule = TokenSchedule(claims, now, self.max_skew)
        except TokenError as exc:
            self._fail(now, rand, exc)
            raise
        self._token = token
        self.schedule = schedule
        self._pending_since = None
        self._retry_at = None
        self.last_error = None
        self.backoff.reset()
        return schedule

    def rejected(self, error, now, rand):
        """Count an unusable answer (e.g. a ``71`` line without a token) as a failed request:
        schedule a retry with backoff and keep the previous token."""
        self._fail(now, rand, error)

    def _fail(self, now, rand, error):
        self.last_error = error
        self._pending_since = None
        self._retry_at = now + self.backoff.next_delay(rand)


def adopt_token_lines(refresher, payload, now, rand):
    """Read a token response (``s/dat``) into ``refresher``; return [(token, schedule)] for each
    adopted ``71`` line and [(None, error)] for each refused one.

    Other SmartREST templates on the topic are not ours and are skipped (issue 4). A line that
    does not parse counts as a failed request (retry with backoff); a token that does not decode
    was already counted by ``received``. The previous token stays in use while valid.
    """
    try:
        lines = smartrest.split_lines(payload)
    except CoreError as exc:
        refresher.rejected(exc, now, rand)
        return [(None, exc)]
    out = []
    for line in lines:
        if smartrest.template_id(line) != "71":
            continue
        try:
            token = smartrest.parse_token(line)
        except CoreError as exc:
            refresher.rejected(exc, now, rand)
            out.append((None, exc))
            continue
        try:
            out.append((token, refresher.received(token, now, rand)))
        except CoreError as exc:  # the refresher already scheduled the retry
            out.append((None, exc))
    return out
