"""How often one key (a client address) may fail before it has to wait: pure, clock given.

Each key may fail `burst` times within `window` seconds; the next attempt inside the window is
answered 429 with Retry-After: the seconds until the oldest of those failures leaves the window, so
every wait ends by itself. The table is bounded (`max_keys`, oldest key dropped first), so guesses
from many addresses cannot grow it without limit. One limiter lives in each station worker process;
with W workers a key can fail up to W x `burst` times per window. Nothing is keyed on what a client
claims (a device id): that would let one client's failures hold up another.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
from collections import OrderedDict, deque


@functools.lru_cache(maxsize=4096)  # parsing an address costs more than the rest of the check
def address_key(client: str) -> str:
    """The key a client address is limited under: an IPv4 address as it is (an IPv4-mapped IPv6
    address as its IPv4 address), an IPv6 address as its /64, since one host usually holds a whole /64
    and could otherwise spread its attempts over 2**64 addresses. Anything else is used as given."""
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


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
