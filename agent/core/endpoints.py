"""MQTT endpoints: the value, its URL form, the order they are tried in, and failover state.

DESIGN.md "Endpoints": try the last endpoint that worked, then the configured or discovered
order; re-discover when a whole round fails. Addresses that are rarely reachable from a device
(loopback of another host, link-local, Docker's default bridge) are tried last, because
Greengrass discovery lists every interface of the core and a device that tries them first
spends a connect timeout on each before reaching the real one.
"""

from agent.core.errors import EndpointError, describe

MANUAL = "manual"
DISCOVERY = "discovery"
LAST_GOOD = "last-good"
SOURCES = (MANUAL, DISCOVERY, LAST_GOOD)
DEFAULT_PORT = 8883
SCHEME = "mqtts://"

_HOST_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:%"
_DIGITS = "0123456789"


def check_host(host, field):
    """Return ``host`` if it is a plausible DNS name or IP literal, else raise EndpointError."""
    if not isinstance(host, str):
        raise EndpointError(field, "expected a host name, got %s" % describe(host))
    if not host:
        raise EndpointError(field, "empty host")
    if len(host) > 253:
        raise EndpointError(field, "host is %d characters, over 253" % len(host))
    for ch in host:
        if ch not in _HOST_CHARS:
            raise EndpointError(field, "character %s not allowed in a host" % describe(ch))
    return host


def check_port(port, field):
    """Return ``port`` if it is an integer 1..65535 (not a bool), else raise EndpointError."""
    if port is True or port is False or not isinstance(port, int) or not 1 <= port <= 65535:
        raise EndpointError(field, "expected integer 1..65535, got %s" % describe(port))
    return port


class Endpoint:
    """An MQTT-over-TLS broker address: ``host``, ``port``, optional ``ca`` and its ``source``.

    ``ca`` is a PEM bundle or a path (None: the configured trust store); ``source`` is one of
    ``manual``, ``discovery``, ``last-good``. Two endpoints are equal when host (case-insensitive)
    and port are equal: the same broker reached twice is one endpoint.
    """

    def __init__(self, host, port=DEFAULT_PORT, ca=None, source=MANUAL):
        self.host = check_host(host, "endpoint.host")
        self.port = check_port(port, "endpoint.port")
        if ca is not None and not isinstance(ca, str):
            raise EndpointError("endpoint.ca", "expected PEM text or a path, got %s" % describe(ca))
        if source not in SOURCES:
            raise EndpointError("endpoint.source", "expected one of %s, got %s" % (SOURCES, describe(source)))
        self.ca = ca
        self.source = source

    def key(self):
        """Identity for de-duplication: (lower-case host, port)."""
        return (self.host.lower(), self.port)

    def url(self):
        """``mqtts://host:port``, with IPv6 literals in brackets."""
        host = "[" + self.host + "]" if ":" in self.host else self.host
        return "%s%s:%d" % (SCHEME, host, self.port)

    def with_source(self, source):
        """A copy of this endpoint with another ``source``."""
        return Endpoint(self.host, self.port, self.ca, source)

    def __eq__(self, other):
        return isinstance(other, Endpoint) and self.key() == other.key()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(self.key())

    def __repr__(self):
        return "Endpoint(%s, source=%s)" % (self.url(), self.source)


def parse_endpoint(url, source=MANUAL, ca=None, field="endpoint"):
    """Parse ``mqtts://host[:port]`` (IPv6 as ``[addr]``) into an Endpoint; port defaults to 8883.

    Raises EndpointError naming ``field`` for other schemes, paths, credentials or bad ports.
    """
    if not isinstance(url, str):
        raise EndpointError(field, "expected a URL string, got %s" % describe(url))
    if not url.startswith(SCHEME):
        scheme = url.split("://", 1)[0] if "://" in url else ""
        raise EndpointError(field, "scheme must be mqtts://, got %s" % describe(scheme or url))
    rest = url[len(SCHEME):]
    if rest.endswith("/"):
        rest = rest[:-1]
    for bad, what in (("/", "a path"), ("@", "credentials"), ("?", "a query"), ("#", "a fragment")):
        if bad in rest:
            raise EndpointError(field, "must not contain %s: %s" % (what, describe(url)))
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise EndpointError(field, "unterminated [ in IPv6 host: %s" % describe(url))
        host = rest[1:close]
        tail = rest[close + 1:]
        if tail and not tail.startswith(":"):
            raise EndpointError(field, "expected :port after ], got %s" % describe(tail))
        port_text = tail[1:] if tail else None
    elif rest.count(":") > 1:
        raise EndpointError(field, "IPv6 hosts must be in brackets: %s" % describe(url))
    elif ":" in rest:
        host, port_text = rest.split(":", 1)
    else:
        host, port_text = rest, None
    port = DEFAULT_PORT
    if port_text is not None:
        # int() would also take "+1", " 1" and non-ASCII digits; a port is ASCII digits only.
        if not port_text or len(port_text) > 5 or any(c not in _DIGITS for c in port_text):
            raise EndpointError(field + ".port", "expected integer 1..65535, got %s" % describe(port_text))
        port = int(port_text)
    check_host(host, field + ".host")
    check_port(port, field + ".port")
    return Endpoint(host, port, ca, source)


def _ipv4(host):
    parts = host.split(".")
    if len(parts) != 4:
        return None
    out = []
    for p in parts:
        if not p or len(p) > 3 or any(c not in _DIGITS for c in p):
            return None
        n = int(p)
        if n > 255:
            return None
        out.append(n)
    return out


def is_unlikely(host, core_is_local=False):
    """True for addresses a device rarely reaches: loopback (unless the core runs on this host),
    IPv4/IPv6 link-local, and Docker's default bridge 172.17.0.0/16."""
    h = host.lower()
    v4 = _ipv4(h)
    if v4 is not None:
        if v4[0] == 127:
            return not core_is_local
        return (v4[0] == 169 and v4[1] == 254) or (v4[0] == 172 and v4[1] == 17)
    if h in ("::1", "localhost") or h.endswith(".localhost"):
        return not core_is_local
    # fe80::/10 covers fe80: through febf:
    return ":" in h and h[:3] in ("fe8", "fe9", "fea", "feb")


def order_endpoints(endpoints, last_good=None, core_is_local=False, demote_unlikely=True):
    """Return the try order: ``last_good`` first, then ``endpoints`` in their given order,
    without duplicates (first occurrence wins, keeping its ``ca``), with unlikely addresses moved
    to the end unless ``demote_unlikely`` is False."""
    seen = {}
    ordered = []
    candidates = list(endpoints)
    if last_good is not None:
        candidates.insert(0, last_good.with_source(LAST_GOOD))
    for ep in candidates:
        if ep.key() in seen:
            continue
        seen[ep.key()] = True
        ordered.append(ep)
    if not demote_unlikely:
        return ordered
    first = [ep for ep in ordered if ep.source == LAST_GOOD or not is_unlikely(ep.host, core_is_local)]
    last = [ep for ep in ordered if ep.source != LAST_GOOD and is_unlikely(ep.host, core_is_local)]
    return first + last


class Rotation:
    """Failover state over an ordered endpoint list.

    ``next()`` hands out endpoints in order, wrapping around; the caller reports ``failed(ep)``
    or ``succeeded(ep)``. ``round_failed()`` is True once every endpoint has failed since the last
    success or ``new_round()``: the caller then backs off, re-discovers and calls ``new_round()``
    (or builds a new Rotation from the new list). ``last_good`` is the endpoint that last worked.
    """

    def __init__(self, endpoints):
        self.endpoints = list(endpoints)
        if not self.endpoints:
            raise EndpointError("endpoints", "no endpoint to connect to (configure one or enable discovery)")
        self.last_good = None
        self._index = 0
        self._failed = {}

    def next(self):
        """The endpoint to try now."""
        ep = self.endpoints[self._index]
        self._index = (self._index + 1) % len(self.endpoints)
        return ep

    def failed(self, endpoint):
        """Record that ``endpoint`` could not be connected or lost its session before working."""
        self._failed[endpoint.key()] = True

    def succeeded(self, endpoint):
        """Record a working session on ``endpoint``: it becomes ``last_good`` and the round restarts
        so the next failover starts from it."""
        self.last_good = endpoint
        self._failed = {}
        for i, ep in enumerate(self.endpoints):
            if ep.key() == endpoint.key():
                self._index = i
                break

    def round_failed(self):
        """True when every endpoint has failed since the last success or ``new_round``."""
        for ep in self.endpoints:
            if ep.key() not in self._failed:
                return False
        return True

    def new_round(self):
        """Forget failures and start again from the first endpoint."""
        self._failed = {}
        self._index = 0
