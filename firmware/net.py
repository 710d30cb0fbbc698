"""Socket and TLS transport for the session: the only firmware module that touches the network.

MicroPython's TLS socket (``ssl`` on mbedTLS, 1.23+) is not CPython's, and these facts, found on
the unix port (DESIGN.md "Tests and real parts"), shape everything here:
- the ``SSLSocket`` has no ``settimeout``; a blocking ``read(n)`` waits for all ``n`` bytes, and a
  TLS socket whose raw socket timed out is dead afterwards (every later call raises ETIMEDOUT).
  So the raw socket is non-blocking, ``select.poll`` on the TLS socket says when to read or write
  (it knows about records mbedTLS already buffered), and every operation has its own deadline;
- ``wrap_socket(..., do_handshake_on_connect=True)`` on a non-blocking socket spins until the
  handshake ends, forever if the broker stalls: the handshake instead runs inside the first
  ``send`` under that call's deadline;
- certificate and host name verification failures raise ValueError, allocation failures
  MemoryError, everything else OSError: all three become ``TransportError``;
- credentials are DER bytes: ``load_cert_chain(cert, key)``, ``load_verify_locations(cadata=)``.

``Connector(ctx)`` also accepts a CPython ``ssl.SSLContext`` (the host-side tests build one from
PEM files): CPython signals "not ready" with SSLWantReadError/SSLWantWriteError instead of None.
"""

import errno
import select
import socket
import sys
import time

try:
    # MicroPython 1.23+: the TLS module itself. Its ``ssl`` is micropython-lib's Python wrapper
    # around ``tls``, whose module and class cost about 0.5 KB of a 32-bit board's heap even frozen.
    import tls as ssl
except ImportError:
    try:
        import ssl  # CPython (the host-side tests)
    except ImportError:  # ports built without TLS; tls_context then explains instead of crashing
        ssl = None

# Platform quirks, one table (the way peterhinch's mqtt_as keeps them at the top):
# busy_errnos: errnos a non-blocking TLS read or write raises instead of returning None. ESP32
#   sockets report 118/119 and ETIMEDOUT as well as EAGAIN (mqtt_as BUSY_ERRORS); on the unix
#   port ETIMEDOUT means the socket is dead, so it is not "busy" there.
# verify: whether the TLS stack can verify the broker certificate (axTLS on ESP8266 cannot, so
#   the port is refused rather than connecting unverified).
_DEFAULT = {"busy_errnos": (errno.EAGAIN,), "verify": True}
QUIRKS = {
    "esp32": {"busy_errnos": (errno.EAGAIN, errno.ETIMEDOUT, 118, 119), "verify": True},
    "esp8266": {"busy_errnos": (errno.EAGAIN,), "verify": False},
    "rp2": _DEFAULT,
    "linux": _DEFAULT,
}

RECV_SIZE = 256  # bytes per read: a packet larger than this arrives in pieces the decoder joins
_DEAD = select.POLLHUP | select.POLLERR
# CPython's "try again" on a non-blocking SSL socket (absent on MicroPython, where read/write
# return None instead).
_BUSY = tuple(getattr(ssl, n) for n in ("SSLWantReadError", "SSLWantWriteError") if hasattr(ssl, n))

try:
    _ticks, _elapsed = time.ticks_ms, time.ticks_diff
except AttributeError:  # CPython

    def _ticks():
        return int(time.monotonic() * 1000)

    def _elapsed(a, b):
        return a - b


def quirks(platform=None):
    """The quirk row for ``platform`` (default: this board's ``sys.platform``)."""
    return QUIRKS.get(platform or sys.platform, _DEFAULT)


class TransportError(OSError):
    """A socket or TLS failure, typed so the session and its supervisor decide without reading text.

    ``kind`` is one of KINDS; ``retryable`` is True for all of them today (the next endpoint, or
    the same one after a backoff, may work), kept so a caller never has to guess.
    """

    KINDS = ("resolve", "connect", "verify", "tls", "timeout", "closed", "memory")

    def __init__(self, kind, detail, retryable=True):
        super().__init__("%s: %s" % (kind, detail))
        self.kind = kind
        self.detail = detail
        self.retryable = retryable


def _text(exc):
    # mbedTLS wraps its messages in newlines: ValueError('\nThe certificate is not ...\n')
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def transport_error(exc, stage, kind=None):
    """``exc`` (OSError, ValueError or MemoryError) as a TransportError for ``stage``."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, MemoryError):
        return TransportError("memory", stage + ": out of memory")
    if isinstance(exc, ValueError):  # mbedTLS and CPython (SSLCertVerificationError) verification
        return TransportError("verify", stage + ": " + _text(exc))
    return TransportError(kind or "tls", stage + ": " + _text(exc))


class TlsTransport:
    """A connected TLS socket with the interface Session expects: send, recv(timeout), close.

    Every failure closes the socket and raises TransportError; later calls raise at once
    ("closed") instead of touching a dead socket.
    """

    def __init__(self, tls, raw, io_timeout, busy_errnos, buf):
        self._tls = tls
        self._raw = raw
        self._io_ms = int(io_timeout * 1000)
        self._busy = busy_errnos
        self._poller = select.poll()
        self._poller.register(tls, select.POLLIN)
        # One receive buffer, the connector's: an allocation per read (or per connection)
        # fragments a small heap until it fails for lack of a contiguous block. CPython has no
        # readinto.
        self._buf = buf
        self._readinto = getattr(tls, "readinto", None)
        self.dead = None  # the TransportError that ended this socket

    def send(self, data):
        """Write all of ``data`` within the I/O deadline (the first call also completes the
        TLS handshake); TransportError on failure or when the deadline passes."""
        start = _ticks()
        view = memoryview(data)
        while view:
            n = self._call(self._tls.write, view, "send")
            if n:
                view = view[n:]
                continue
            left = self._io_ms - _elapsed(_ticks(), start)
            if left <= 0 or not self._wait(select.POLLOUT, left):
                raise self._fail(TransportError("timeout", "send: no progress within %d ms" % self._io_ms))

    def recv(self, timeout):
        """What has arrived, up to RECV_SIZE bytes (a view valid until the next ``recv``); ``b""``
        when the broker closed the connection; None when nothing arrived within ``timeout`` seconds
        (or only part of a TLS record)."""
        data = self._read()
        if data is not None:
            return data
        events = self._wait(select.POLLIN, int(timeout * 1000))
        if not events:
            return None
        data = self._read()
        if data is None and events & _DEAD:
            raise self._fail(TransportError("closed", "recv: socket hung up or failed"))
        return data

    def close(self):
        """Close the socket (idempotent, never raises)."""
        for sock in (self._tls, self._raw):
            try:
                sock.close()
            except (OSError, ValueError, MemoryError):
                pass  # already gone: closing is all that was left to do

    # -- internals ---------------------------------------------------------------------------

    def _read(self):
        if self._readinto is None:
            return self._call(self._tls.read, RECV_SIZE, "recv")
        n = self._call(self._readinto, self._buf, "recv")
        if n is None:
            return None
        if not n:
            return b""
        # a view of the one buffer, not a copy: the session's decoder copies it before the next read
        return memoryview(self._buf)[:n]

    def _call(self, fn, arg, stage):
        if self.dead is not None:
            raise TransportError("closed", "%s: socket already failed (%s)" % (stage, self.dead))
        try:
            return fn(arg)
        except (OSError, ValueError, MemoryError) as exc:
            if isinstance(exc, _BUSY) or (isinstance(exc, OSError) and exc.args and exc.args[0] in self._busy):
                return None
            raise self._fail(transport_error(exc, stage)) from None

    def _wait(self, mask, ms):
        """Poll events (an int, 0 on timeout) for ``mask`` within ``ms`` milliseconds."""
        self._poller.modify(self._tls, mask)
        try:
            ready = self._poller.poll(max(0, ms))
        except (OSError, ValueError, MemoryError) as exc:
            raise self._fail(transport_error(exc, "poll")) from None
        events = 0
        for entry in ready:
            events |= entry[1]
        return events

    def _fail(self, error):
        self.dead = error
        self.close()
        return error


class Connector:
    """``connect(endpoint)`` for Session: TCP within ``timeout`` seconds, then a non-blocking TLS
    socket whose every operation has the same deadline. Raises TransportError.

    One receive buffer, allocated here while the heap is whole; one connection at a time.
    (No spare block is held for the next handshake any more: measured on the unix port, holding
    6 KB changed neither the smallest heap completing the cycle nor failover after kill -9 at it,
    32-bit frozen 29K/30K, 64-bit .mpy 101K/102K; docs/firmware.md "Heap".)
    """

    def __init__(self, ctx, timeout=10, platform=None):
        self._ctx = ctx
        self._timeout = timeout
        self._busy = quirks(platform)["busy_errnos"]
        self._buf = bytearray(RECV_SIZE)

    def __call__(self, endpoint):
        try:
            info = socket.getaddrinfo(endpoint.host, endpoint.port, 0, socket.SOCK_STREAM)[0]
        except (OSError, MemoryError) as exc:
            raise transport_error(exc, "resolve " + endpoint.host, "resolve") from None
        sock = None
        try:
            sock = socket.socket(info[0], info[1], info[2])
            sock.settimeout(self._timeout)
            sock.connect(info[-1])
            sock.setblocking(False)
            # server_hostname gives SNI and makes the TLS stack check the name (umqtt.simple).
            tls = self._ctx.wrap_socket(sock, server_hostname=endpoint.host, do_handshake_on_connect=False)
        except (OSError, ValueError, MemoryError) as exc:
            if sock is not None:
                sock.close()
            raise transport_error(exc, "connect %s:%d" % (endpoint.host, endpoint.port), "connect") from None
        return TlsTransport(tls, sock, self._timeout, self._busy, self._buf)
