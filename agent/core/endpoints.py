"""MQTT endpoints: the value, its URL form and failover state over a list of them.

DESIGN.md "Endpoints": try the last endpoint that worked, then the configured or discovered
order; re-discover when a whole round fails. Reading URLs and putting a list in try order is
agent/core/endpoint_list.py's: a board does it once at start-up and then drops that module.
"""

from agent.core.errors import EndpointError, describe

MANUAL = "manual"
DISCOVERY = "discovery"
LAST_GOOD = "last-good"
SOURCES = (MANUAL, DISCOVERY, LAST_GOOD)
DEFAULT_PORT = 8883
SCHEME = "mqtts://"

_HOST_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:%"


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
