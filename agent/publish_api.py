"""The local publish API: a UNIX socket in the state directory that device applications write to.

Wire format, one JSON object per line each way (in order, so requests can be pipelined):

    -> {"topic": "telemetry/temp", "payload_b64": "MjEuNQ==", "qos": 1}     ("payload": "text" also works)
    <- {"ok": true, "id": 42}                 once the message is durably in the outbox
    <- {"ok": false, "error": "topic '/other/x' is outside this device's prefix ..."}

Topics are relative to the device's prefix, or absolute with a leading "/" (agent.outbox.resolve_topic).
Lines that arrive together are queued in one transaction (one fsync), so a client that pipelines
pays little per message. The socket is mode 0600 in a 0700 directory: only the agent's user (or
root) may publish as the device.

This module is the server, inside `tether run`; the client (`Publisher`, `tether publish`) is
agent.publisher, which `tether run` never loads; an application's connection is served by
agent.publish_conn, loaded with the first one (issue 24).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

from agent.component import Component
from agent.config import Config
from agent.errors import AgentError

log = logging.getLogger("tether.outbox")
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; longer paths are reached through /proc/self/fd


def socket_path(config: Config) -> str:
    return config.outbox.socket or config.state.publish_socket


@contextlib.contextmanager
def addressable(path: str) -> Iterator[str]:
    """A name for `path` that fits in sockaddr_un (deep test or container paths do not)."""
    if len(os.fsencode(path)) < _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


# -- server (inside `tether run`) ------------------------------------------------------------------------
class PublishServer(Component):
    """Accepts connections on the socket and hands each batch of lines to `outbox.publish_many`."""

    RETRY_EVERY = 5.0  # seconds between attempts to bind after a failure (full disk, stale file)

    def __init__(self, path: str | os.PathLike[str], outbox: Any) -> None:
        self.path = os.fspath(path)
        self.outbox = outbox
        self.sock: socket.socket | None = None
        self.error = ""
        self._next_try = 0.0

    def wake_at(self, now: float) -> float | None:
        if self.sock is not None:
            return None
        return now + max(0.0, self._next_try - time.monotonic())

    def tick(self, now: float) -> None:
        """Runtime hook: bind again if the socket could not be served at start (full disk)."""
        if self.sock is None and time.monotonic() >= self._next_try:
            self.try_start()

    def try_start(self) -> bool:
        """`start()` that logs a failure (once per reason) and schedules a retry instead of raising."""
        try:
            self.start()
        except AgentError as exc:
            self._next_try = time.monotonic() + self.RETRY_EVERY
            if str(exc) != self.error:
                log.error("publish API: %s; applications cannot queue messages until this is fixed", exc)
            self.error = str(exc)
            return False
        if self.error:
            log.info("publish API: serving %s again", self.path)
            self.error = ""
        return True

    def start(self) -> PublishServer:
        """Bind (replacing a stale socket left by a killed agent) and serve in daemon threads.
        Raises AgentError when another agent serves the path or it cannot be bound."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        with addressable(self.path) as name:
            if os.path.lexists(self.path):
                if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    raise AgentError(f"{self.path}: exists and is not a socket; remove it or set [outbox] socket")
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, \
                        contextlib.suppress(OSError):
                    probe.connect(name)
                    raise AgentError(f"{self.path}: another agent is serving this publish socket")
                os.unlink(self.path)
        sock = self._bind_private()
        self.sock = sock
        threading.Thread(target=self._accept, name="publish-api", daemon=True).start()
        return self

    def _bind_private(self) -> socket.socket:
        """A listening socket at `self.path` that no one else could ever connect to: bound inside a
        fresh 0700 directory, made 0600, then renamed into place (the process umask is left alone:
        other threads write files meanwhile)."""
        import tempfile

        try:
            private = tempfile.mkdtemp(prefix=".publish-", dir=os.path.dirname(self.path) or ".")  # mode 0700
        except OSError as exc:
            raise AgentError(f"{self.path}: cannot serve the publish socket: {exc.strerror}") from exc
        staged = os.path.join(private, os.path.basename(self.path))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with addressable(staged) as name:
                sock.bind(name)
            os.chmod(staged, 0o600)
            sock.listen(16)
            os.rename(staged, self.path)
        except OSError as exc:
            sock.close()
            raise AgentError(f"{self.path}: cannot serve the publish socket: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            with contextlib.suppress(OSError):
                os.rmdir(private)
        return sock

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by stop()
                return
            from agent.publish_conn import serve  # with the first application's connection (see ALLOWED)

            threading.Thread(target=serve, args=(conn, self.outbox), name="publish-conn", daemon=True).start()

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def __getattr__(name: str) -> Any:
    """`agent.publish_api.Publisher` and `PublishError`, as applications imported them before the client
    moved to agent.publisher: loaded when an application asks, never by `tether run`."""
    if name in ("Publisher", "PublishError"):
        from agent import publisher  # the client, for an application that imports it from here (see ALLOWED)

        return getattr(publisher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
