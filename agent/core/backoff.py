"""Exponential backoff with full jitter and a cap.

"Full jitter" (AWS Architecture Blog, "Exponential Backoff and Jitter", 2015): the delay is
uniform in [0, min(cap, base * factor ** attempt)), which spreads a fleet that lost its broker
at the same moment instead of having it reconnect in waves.
"""

from agent.core.errors import ParameterError


class Backoff:
    """Delay generator; ``attempts`` counts delays handed out since the last ``reset``."""

    def __init__(self, base, cap, factor=2):
        if not base > 0:
            raise ParameterError("backoff.base", "must be > 0, got %r" % (base,))
        if not cap >= base:
            raise ParameterError("backoff.cap", "must be >= base %r, got %r" % (base, cap))
        if not factor >= 1:
            raise ParameterError("backoff.factor", "must be >= 1, got %r" % (factor,))
        self.base = base
        self.cap = cap
        self.factor = factor
        self.attempts = 0
        self._ceiling = base

    def ceiling(self):
        """Upper bound of the next delay."""
        return self._ceiling

    def next_delay(self, rand):
        """Return the next delay in seconds, ``rand * ceiling``, and grow the ceiling.

        ``rand`` is a float in [0, 1) from the caller's random source; ParameterError otherwise.
        """
        if not 0 <= rand < 1:
            raise ParameterError("backoff.rand", "must be in [0, 1), got %r" % (rand,))
        delay = rand * self._ceiling
        self.attempts += 1
        # Grow multiplicatively and clamp, rather than base * factor ** attempts, so a device
        # that has been offline for a week never computes an overflowing power.
        self._ceiling = min(self.cap, self._ceiling * self.factor)
        return delay

    def reset(self):
        """Start again from ``base`` (after a success)."""
        self.attempts = 0
        self._ceiling = self.base
