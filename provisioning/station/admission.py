"""Who gets a connection at the station before anyone has authenticated: the rules pure, clock given.

Three limits, all per worker process, applied together at accept by `Admission` (the EST loop's
gate, which also writes the log lines about refusals, each at most once per peer or per
FULL_LOG_EVERY seconds):

- `max_per_client`: the connections one address may hold at once; more are closed at accept.
- `HandshakeBudget`: the CPU one peer may make us spend on TLS handshakes (issue 22 item 4). Each peer
  has a bucket of `burst` CPU seconds that refills at `rate` CPU seconds per second; every handshake
  step is charged what it really cost (the loop measures its thread's CPU time around it), and a peer
  whose bucket is empty has its new connections closed at accept, before any TLS, until it refills.
  Measured CPU rather than a count of handshakes, so whatever makes a handshake dear (a big key share,
  a long client chain to verify) is paid from the same budget. A peer is an IPv4 address or an IPv6
  /64 (one host usually holds a whole /64). A connection accepted while the bucket still held
  something finishes its handshake: with `max_per_client` connections at once a peer can overdraw by
  that many handshakes, which the refill then has to pay back first.
- `oldest_waiting`: when a worker holds `max_connections`, which connection makes room for a new one.
  The oldest that is still shaking hands or reading a request (idle, kept alive or trickling) is
  closed; connections whose request is being computed or answered are never touched. Why not refuse
  the newcomer instead: then whoever fills the table keeps everyone else out, and keeping it full
  takes only `max_connections` new connections per request deadline. Evicting the oldest means an
  attacker must open connections faster than a real client finishes its request (tens of
  milliseconds), across many addresses (each holds at most `max_per_client`). Only when every held
  connection is busy is the newcomer refused.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from typing import Protocol, TypeVar

log = logging.getLogger("tether.station")

HANDSHAKE_BURST = 30.0  # a peer's handshake budget holds this many seconds' worth of `handshake_cpu`
FULL_LOG_EVERY = 10.0   # seconds between log lines about a full connection table
WAITING = frozenset({"handshake", "read"})  # connection states that hold no request being served


@functools.lru_cache(maxsize=4096)  # parsing an address costs more than the rest of the check
def peer_key(address: str) -> str:
    """The unit a budget is kept for: the IPv4 address (also when mapped into IPv6), or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class HandshakeBudget:
    """Token buckets of CPU seconds per peer key. `rate` 0 disables the budget (every peer allowed)."""

    def __init__(self, rate: float, burst: float, max_peers: int = 65536) -> None:
        if rate < 0 or (rate > 0 and burst <= 0):
            raise ValueError(f"handshake budget: rate {rate} must be >= 0 and burst {burst} > 0 CPU seconds")
        self.rate = rate
        self.burst = burst
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (level, at)

    def allows(self, key: str, now: float) -> bool:
        """True if `key` may start a handshake now (its bucket is not empty)."""
        return self.rate == 0 or self._level(key, now) > 0

    def wait(self, key: str, now: float) -> float:
        """Seconds until `key` may start a handshake again (0 if it may now)."""
        level = self._level(key, now) if self.rate else 1.0
        return 0.0 if level > 0 else -level / self.rate

    def charge(self, key: str, cpu: float, now: float) -> None:
        """`key` made us spend `cpu` seconds of CPU at `now`."""
        if self.rate == 0:
            return
        level = self._level(key, now) - cpu
        if level >= self.burst:
            self._buckets.pop(key, None)
            return
        self._buckets[key] = (level, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_peers:
            # the peer charged longest ago goes first; its bucket has had the longest to refill
            self._buckets.popitem(last=False)

    def _level(self, key: str, now: float) -> float:
        level, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, level + (now - at) * self.rate)


class _Held(Protocol):
    @property
    def state(self) -> str: ...


H = TypeVar("H", bound=_Held)


def oldest_waiting(held: Iterable[H]) -> H | None:
    """The first connection of `held` (in the order they were accepted) still shaking hands or reading
    a request, or None when all of them are being served."""
    return next((conn for conn in held if conn.state in WAITING), None)


class Admission:
    """One worker's gate at accept: the per-address cap, the handshake budget and the connection table's
    room, in that order. A connection admitted is counted until the loop says it is `closed`."""

    def __init__(self, max_per_client: int, max_connections: int, handshake_cpu: float) -> None:
        self.max_per_client = max_per_client
        self.max_connections = max_connections
        self.handshake_cpu = handshake_cpu
        self.per_client: collections.Counter[str] = collections.Counter()
        self.capped: set[str] = set()   # addresses whose refusal was logged (once until they drop below the cap)
        self.budget = HandshakeBudget(handshake_cpu, handshake_cpu * HANDSHAKE_BURST)
        self.overdrawn: set[str] = set()  # peers whose budget refusal was logged (once until allowed again)
        self._full_since_log = 0        # connections closed or refused for a full table since the last log line
        self._full_logged_at = -FULL_LOG_EVERY

    def admit(self, addr: str, now: float, held: Collection[H], close: Callable[[H], None]) -> bool:
        """True if a new connection from `addr` may be held (and it is counted from now on), with `held`
        the worker's connections in the order they were accepted; a full table makes room by
        `close`-ing the oldest waiting one. One call per accept: this is on every enrollment's path."""
        cap = self.max_per_client
        if cap and self.per_client[addr] >= cap:
            if addr not in self.capped:
                self.capped.add(addr)
                log.warning("%s holds %d connections already (max_per_client); closing new ones", addr, cap)
            return False
        key = peer_key(addr)
        if self.budget.allows(key, now):
            self.overdrawn.discard(key)
        else:
            self._overdrawn(key, now)
            return False
        if self.max_connections and len(held) >= self.max_connections and not self._room(now, held, close):
            return False
        self.per_client[addr] += 1  # counted after `_room`, which may close one of this address's own
        return True

    def closed(self, addr: str) -> None:
        self.per_client[addr] -= 1
        if self.per_client[addr] <= 0:
            del self.per_client[addr]
        if self.per_client[addr] < self.max_per_client:
            self.capped.discard(addr)

    def _overdrawn(self, key: str, now: float) -> None:
        if key not in self.overdrawn:
            if len(self.overdrawn) > 4096:
                self.overdrawn.clear()  # bounded; a peer then gets one more log line
            self.overdrawn.add(key)
            log.warning("%s spent its TLS handshake CPU budget (handshake_cpu %.3g s/s); closing its new "
                        "connections for %.1f s", key, self.handshake_cpu, self.budget.wait(key, now))

    def _room(self, now: float, held: Collection[H], close: Callable[[H], None]) -> bool:
        """The table is full: close the oldest waiting connection (True), or refuse the newcomer."""
        cap = self.max_connections
        victim = oldest_waiting(held)
        if victim is not None:
            close(victim)
        self._full_since_log += 1
        if now - self._full_logged_at >= FULL_LOG_EVERY:
            log.warning("this worker holds %d connections (max_connections): %d oldest waiting ones closed or "
                        "new ones refused since the last such line", cap, self._full_since_log)
            self._full_since_log, self._full_logged_at = 0, now
        return victim is not None
