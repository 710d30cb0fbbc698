"""The endpoint list a device starts from: configured URLs parsed into Endpoints, in try order.

Addresses that are rarely reachable from a device (loopback of another host, link-local, Docker's
default bridge) are tried last, because Greengrass discovery lists every interface of the core and
a device that tries them first spends a connect timeout on each before reaching the real one
(DESIGN.md "Endpoints").

A board reads its URLs once, at start-up: firmware/tether_main.py drops this module whole with the
other setup modules, so its code and strings are not in a small heap while the session runs; the
connection machine needs only agent/core/endpoints.py (tests/unit/test_layers.py, rule 5).
"""

from agent.core.endpoints import DEFAULT_PORT, LAST_GOOD, MANUAL, SCHEME, Endpoint, check_host, check_port
from agent.core.errors import EndpointError, describe

_DIGITS = "0123456789"


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
