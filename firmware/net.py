"""Socket and TLS adapter for MicroPython boards: the only firmware module that touches the network.

Deliberately thin: it opens a TCP socket, wraps it in mutual TLS and exposes the
``send``/``recv(timeout)``/``close`` transport that ``session.Session`` expects. It cannot run in
the WebAssembly test runtime (no socket or ssl there), which is why nothing else lives here.
TLS follows MicroPython's ``ssl`` module (1.23+, built on ``tls``): ``SSLContext(PROTOCOL_TLS_CLIENT)``,
``load_cert_chain(cert, key)`` and ``load_verify_locations(cadata=...)`` taking DER bytes, and
``wrap_socket(sock, server_hostname=...)`` for SNI and host name checks, as micropython-lib's
``umqtt.simple`` does.
"""

import errno
import socket
import sys

try:
    import ssl
except ImportError:  # ports built without TLS; open_tls then explains instead of crashing
    ssl = None

# Platform quirks, one table (the way peterhinch's mqtt_as keeps them at the top):
# busy_errnos: errnos a timed-out read raises instead of returning nothing. ESP32 TLS sockets
#   report 118/119 as well as EAGAIN/ETIMEDOUT (mqtt_as BUSY_ERRORS).
# read_none: a TLS socket's read() returns None, not b"", when no data is ready (ESP32, rp2).
# verify: whether the TLS stack can verify the broker certificate (axTLS on ESP8266 cannot,
#   so the port is refused rather than connecting unverified).
_DEFAULT = {"busy_errnos": (errno.EAGAIN, errno.ETIMEDOUT), "read_none": True, "verify": True}
QUIRKS = {
    "esp32": {"busy_errnos": (errno.EAGAIN, errno.ETIMEDOUT, 118, 119), "read_none": True, "verify": True},
    "esp8266": {"busy_errnos": (errno.EAGAIN, errno.ETIMEDOUT), "read_none": True, "verify": False},
    "rp2": _DEFAULT,
    "linux": {"busy_errnos": (errno.EAGAIN, errno.ETIMEDOUT), "read_none": False, "verify": True},
}


def quirks(platform=None):
    """The quirk row for ``platform`` (default: this board's ``sys.platform``)."""
    return QUIRKS.get(platform or sys.platform, _DEFAULT)


class TlsTransport:
    """A connected TLS socket with the transport interface Session expects."""

    def __init__(self, sock, busy_errnos):
        self._sock = sock
        self._busy = busy_errnos

    def send(self, data):
        """Write all of ``data``; raises OSError if the socket fails."""
        view = memoryview(data)
        while view:
            n = self._sock.write(view)
            if n is None:  # non-blocking TLS write made no progress yet
                continue
            view = view[n:]

    def recv(self, timeout):
        """Up to 1024 bytes; ``b""`` when the broker closed; None after ``timeout`` seconds idle."""
        self._sock.settimeout(max(0.01, timeout))
        try:
            data = self._sock.read(1024)
        except OSError as exc:
            if exc.args and exc.args[0] in self._busy:
                return None
            raise
        return data

    def close(self):
        """Close the socket."""
        self._sock.close()


def tls_context(cert_der, key_der, ca_der):
    """An SSLContext presenting the device certificate/key (DER) and trusting ``ca_der`` only."""
    if ssl is None:
        raise OSError("this MicroPython build has no ssl module; a TLS-capable firmware is required")
    if not quirks()["verify"]:
        raise OSError("%s cannot verify broker certificates; refusing unverified TLS" % sys.platform)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(cert_der, key_der)
    ctx.load_verify_locations(cadata=ca_der)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def connector(ctx, timeout=10):
    """A ``connect(endpoint)`` function for Session that opens a verified TLS connection."""
    busy = quirks()["busy_errnos"]

    def connect(endpoint):
        addr = socket.getaddrinfo(endpoint.host, endpoint.port, 0, socket.SOCK_STREAM)[0][-1]
        sock = socket.socket()
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
            # server_hostname gives SNI and makes the TLS stack check the name (umqtt.simple).
            tls = ctx.wrap_socket(sock, server_hostname=endpoint.host)
        except OSError:
            sock.close()
            raise
        return TlsTransport(tls, busy)

    return connect
