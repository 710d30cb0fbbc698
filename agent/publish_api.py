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
agent.publisher, which `tether run` never loads (issue 24).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from agent.component import Component
from agent.config import Config
from agent.errors import AgentError
from agent.outbox import OutboxError

log = logging.getLogger("tether.outbox")
MAX_LINE = 4 << 20   # a base64 line for a ~3 MiB payload; longer lines close the connection
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
            threading.Thread(target=self._serve, args=(conn,), name="publish-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        import json  # with the first application's connection: `tether run` starts without json (issue 24)

        with conn:
            buffer = b""
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                replies = self.handle([line for line in lines if line.strip()])
                if len(buffer) > MAX_LINE:
                    replies.append({"ok": False, "error": f"request line longer than {MAX_LINE} bytes"})
                try:
                    if replies:
                        conn.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in replies))
                except OSError:
                    return
                if len(buffer) > MAX_LINE:
                    return

    def handle(self, lines: Sequence[bytes]) -> list[dict[str, Any]]:
        """One reply per request line, in order; the well-formed ones are queued together."""
        parsed: list[tuple[str, bytes, int] | str] = [_parse(line) for line in lines]
        items = [p for p in parsed if not isinstance(p, str)]
        try:
            results = iter(self.outbox.publish_many(items) if items else [])
        except OutboxError as exc:
            log.warning("publish API: %s", exc)
            return [{"ok": False, "error": p if isinstance(p, str) else str(exc)} for p in parsed]
        replies = []
        for p in parsed:
            result = p if isinstance(p, str) else next(results)
            replies.append({"ok": True, "id": result} if isinstance(result, int) else
                           {"ok": False, "error": str(result)})
        return replies

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _parse(line: bytes) -> tuple[str, bytes, int] | str:
    """(topic, payload, qos) from one request line, or the reason it is not a request."""
    import json  # see _serve

    try:
        request = json.loads(line)
    except ValueError as exc:
        return f"not a JSON object: {exc}"
    if not isinstance(request, dict) or not isinstance(request.get("topic"), str):
        return 'expected {"topic": "...", "payload_b64": "..." or "payload": "...", "qos": 0|1}'
    qos = request.get("qos", 1)
    if not isinstance(qos, int) or isinstance(qos, bool):
        return f"qos must be 0 or 1, got {qos!r}"
    if "payload_b64" in request:
        try:
            payload = base64.b64decode(request["payload_b64"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            return f"payload_b64 is not base64: {exc}"
    elif isinstance(request.get("payload", ""), str):
        payload = request.get("payload", "").encode()
    else:
        return "payload must be a string (or use payload_b64 for bytes)"
    return request["topic"], payload, qos
