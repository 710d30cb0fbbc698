"""Key exchange for every TLS server we run (the station's EST port and console, the lab's servers):
elliptic curves only, so no client can make us pay for a finite-field key share before it has
authenticated.

Why (issue 22 item 4): OpenSSL 3.0 offers the RFC 7919 groups ffdhe2048..ffdhe8192 for TLS 1.3 by
default. A ClientHello carrying an ffdhe8192 key share costs the server about 115 ms of CPU (X25519:
0.75 ms) and the client nothing, so four senders at 12 KiB/s pushed a `cacerts` from 50 ms to 12 s.
The groups are X25519, P-256 and P-384 (every TLS 1.3 client must offer P-256 or X25519, RFC 8446
9.1); TLS 1.2 keeps only ECDHE suites with AEAD or SHA-2 MACs: no DHE (the same finite-field
exponentiation) and no RSA key transport.

How: Python 3.11's `ssl` has no way to set the groups list (`set_ecdh_curve` sets exactly one curve,
and cannot name X25519 on every patch level). The options were

- an OpenSSL configuration (`OPENSSL_CONF` with `ssl_conf` / `system_default` / `Groups`): it must be in
  the environment before `ssl` is first imported, applies to every TLS context of the process (the
  PostgreSQL driver's too) and replaces the system's openssl.cnf, and a process started any other way
  (a test, a systemd unit without the line) silently runs without it; issue 22 item 2 shows what
  handing OpenSSL a configuration path costs when anyone else can write to it;
- `SSL_CTX_set1_groups_list` through ctypes on the context's own `SSL_CTX`: one call on exactly the
  contexts we mean, whatever started the process, checked where it is made.

This module does the second, and refuses to go on when it cannot be sure it worked: the `SSL_CTX`
pointer is read from the `_ssl._SSLContext` object (CPython's `PySSLContext` begins with the object
header and then `SSL_CTX *ctx`, unchanged since Python 3.4), and before anything is written through it,
OpenSSL's own `SSL_CTX_get_options` on that pointer must return the options Python reports for the
context.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import ssl
import sys

from provisioning import ProvisioningError

GROUPS = ("X25519", "P-256", "P-384")
# TLS 1.2 only (TLS 1.3 suites are set apart and all use the groups above): ECDHE key exchange only
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL:!SHA1:!AESCCM"
_SSL_CTRL_SET_GROUPS_LIST = 92  # ssl.h: SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl
_SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_CTRL_GET_SESS_CACHE_MODE = 44, 45  # SSL_CTX_set/get_session_cache_mode
_SSL_SESS_CACHE_OFF = 0
_SSL_CTRL_GET_READ_AHEAD, _SSL_CTRL_SET_READ_AHEAD = 40, 41  # SSL_CTX_get/set_read_ahead


class TlsSetupError(ProvisioningError):
    """The key-exchange groups could not be restricted; a server must not start without them."""


def restrict_key_exchange(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Limit a server context to ECDHE over X25519, P-256 and P-384; returns `ctx`.

    Raises TlsSetupError, naming what failed, when the groups cannot be set or checked.
    """
    ctx.set_ciphers(CIPHERS)
    set_groups_list(ctx, ":".join(GROUPS))
    return ctx


def set_groups_list(ctx: ssl.SSLContext, groups: str) -> None:
    """Set `groups` (OpenSSL names, colon-separated) on any context; raises TlsSetupError. Tests also
    use it to make a client that offers only ffdhe8192."""
    lib, pointer = _ssl_ctx(ctx)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        raise TlsSetupError(f"OpenSSL ({ssl.OPENSSL_VERSION}) refused the groups list {groups!r}")


def no_resumption(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Make a server context keep no sessions: no TLS 1.3 tickets (`num_tickets = 0`), no TLS 1.2
    tickets (`OP_NO_TICKET`) and no server-side session cache (`SSL_CTX_set_session_cache_mode` OFF,
    which Python's `ssl` does not expose). For servers whose clients never resume (a device enrolls
    once a year): each handshake then writes no ticket and stores no session, and OpenSSL never scans
    a cache to expire them (it does so every 255 handshakes). Returns `ctx`; TlsSetupError when the
    cache mode cannot be set and read back."""
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    lib, pointer = _ssl_ctx(ctx)
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != _SSL_SESS_CACHE_OFF:
        raise TlsSetupError(f"OpenSSL ({ssl.OPENSSL_VERSION}) did not turn the session cache off")
    return ctx


def read_ahead(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Let OpenSSL read whatever the socket holds in one `read` (`SSL_CTX_set_read_ahead`, which Python's
    `ssl` does not expose) instead of each record's 5-byte header and then its body: a client's second
    handshake flight and its request arrive as five or six records, which cost two `read`s each
    (issue 24 item 3: 14.5 reads per enrollment). Bytes read ahead wait in OpenSSL, where `SSL_pending`
    and the selector do not see them, so a server using this must read until SSLWantReadError before
    it waits on the socket again (`loop.EstServer` does). Returns `ctx`; TlsSetupError when the
    setting cannot be read back."""
    lib, pointer = _ssl_ctx(ctx)
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_READ_AHEAD, 0, None) != 1:
        raise TlsSetupError(f"OpenSSL ({ssl.OPENSSL_VERSION}) did not turn read-ahead on")
    return ctx


def _ssl_ctx(ctx: ssl.SSLContext) -> tuple[ctypes.CDLL, int]:
    """The libssl that `_ssl` is linked against, and `ctx`'s SSL_CTX pointer, checked."""
    lib = _libssl()
    return lib, _verified(lib, _read_pointer(ctx), ctx)


@functools.cache
def _libssl() -> ctypes.CDLL:
    # dlsym on the extension's handle also searches what it was linked with: the same libssl, not another
    lib = ctypes.CDLL(getattr(_ssl, "__file__", None))
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    return lib


def _read_pointer(ctx: ssl.SSLContext) -> int | None:
    """The word after the object header of `ctx`: PySSLContext's `SSL_CTX *ctx` on CPython."""
    header = object.__basicsize__
    if sys.implementation.name != "cpython" or _ssl._SSLContext.__basicsize__ < header + ctypes.sizeof(ctypes.c_void_p):
        raise TlsSetupError(f"cannot find the SSL_CTX of a {sys.implementation.name} SSLContext: "
                            "the key-exchange groups cannot be restricted on this interpreter")
    return ctypes.c_void_p.from_address(id(ctx) + header).value


def _verified(lib: ctypes.CDLL, pointer: int | None, ctx: ssl.SSLContext) -> int:
    """`pointer`, once OpenSSL has answered for it with the options Python reports for `ctx`."""
    if not pointer or lib.SSL_CTX_get_options(pointer) != ctx.options:
        raise TlsSetupError("the SSL_CTX read from the SSLContext does not answer with its options: this "
                            "interpreter lays out SSLContext differently, so the key-exchange groups cannot be set")
    return pointer
