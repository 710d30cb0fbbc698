"""How often one key (a device id, a client address) may fail before it has to wait: pure, clock given.

Each key may fail `burst` times within `window` seconds; the next attempt inside the window is
answered 429 with Retry-After: the seconds until the oldest of those failures leaves the window. The
table is bounded (`max_keys`, oldest key dropped first), so guesses from many addresses cannot grow
it without limit. One limiter lives in each station worker process; with W workers a key can fail
up to W x `burst` times per window, and the ledger's lockout (station.toml otp_max_failures) is the
bound that holds across workers and restarts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque


class FailureLimiter:
    def __init__(self, burst: int, window: float, max_keys: int = 65536) -> None:
        if burst < 1 or window <= 0:
            raise ValueError(f"rate limit: burst {burst} must be >= 1 and window {window} > 0 seconds")
        self.burst = burst
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, key: str, now: float) -> int | None:
        """Seconds `key` must wait before its next attempt (at least 1), or None if it may go now."""
        with self._lock:
            times = self._recent(key, now)
            if times is None or len(times) < self.burst:
                return None
            return max(1, int(times[0] + self.window - now + 0.999))

    def failed(self, key: str, now: float) -> None:
        """Record one failure of `key` at `now`."""
        with self._lock:
            times = self._recent(key, now)
            if times is None:
                times = self._failures[key] = deque(maxlen=self.burst)
                while len(self._failures) > self.max_keys:
                    self._failures.popitem(last=False)
            times.append(now)
            self._failures.move_to_end(key)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        return times
