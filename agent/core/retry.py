"""Retry decisions made from an error's ``retryable`` flag, never from its text.

Shaped after iot-identity-service's cert-renewal engine: a retryable failure is scheduled again at
``now`` plus a backoff delay; a fatal one stops, and the caller says so in a log line. Used by the
OTA download loop, certificate renewal and the boot sequence.
"""

from agent.core.errors import ParameterError


class Retry:
    """``after(retryable, now, rand)``: device time of the next attempt, or None to give up.

    ``backoff`` is an agent.core.backoff.Backoff; ``attempts`` (None: no limit) caps how many
    retryable failures in a row are retried. ``reset()`` after a success.
    """

    def __init__(self, backoff, attempts=None):
        if attempts is not None and attempts < 1:
            raise ParameterError("retry.attempts", "must be >= 1, got %r" % (attempts,))
        self.backoff = backoff
        self.attempts = attempts
        self.failures = 0

    def after(self, retryable, now, rand):
        """Record a failure; return when to try again, or None (fatal, or out of attempts)."""
        self.failures += 1
        if not retryable:
            return None
        if self.attempts is not None and self.failures > self.attempts:
            return None
        return now + self.backoff.next_delay(rand)

    def reset(self):
        self.failures = 0
        self.backoff.reset()
