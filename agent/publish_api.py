"""The local publish API: a UNIX socket in the state directory that device applications write to.

Wire format, one JSON object per line each way (in order, so requests can be pipelined):

    -> {"topic": "telemetry/temp", "payload_b64": "MjEuNQ==", "qos": 1}     ("payload": "text" also works)
    <- {"ok": true, "id": 42}                 once the message is durably in the outbox
    <- {"ok": false, "error": "topic '/other/x' is outside this device's prefix ..."}

Topics are relative to the device's prefix, or absolute with a leading "/" (agent.outbox.resolve_topic).
Lines that arrive together are queued in one transaction (one fsync), so a client that pipelines
pays little per message. The socket is mode 0600 in a 0700 directory: only the agent's user (or
root) may publish as the device.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from agent.component import Component
from agent.config import Config
from agent.errors import AgentError
from agent.outbox import OutboxError

if TYPE_CHECKING:
    import argparse  # `tether publish`'s arguments; argparse itself loads only for that command (issue 24)

log = logging.getLogger("tether.outbox")
MAX_LINE = 4 << 20   # a base64 line for a ~3 MiB payload; longer lines close the connection
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; longer paths are reached through /proc/self/fd


class PublishError(AgentError):
    """The agent refused a message or could not be reached. `queued` holds the ids of the messages
    of the same call that were queued before the failure."""

    def __init__(self, message: str, queued: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.queued = list(queued)


def socket_path(config: Config) -> str:
    return config.outbox.socket or config.state.publish_socket


@contextlib.contextmanager
def _addressable(path: str) -> Iterator[str]:
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
        with _addressable(self.path) as name:
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
            with _addressable(staged) as name:
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


# -- client (device applications, `tether publish`) -------------------------------------------------------
class Publisher:
    """A device application's handle on the agent's outbox, through the local socket.

    `publish()` returns once the message is durably queued (it survives kill -9 and power cuts from
    then on) and raises PublishError with the agent's reason otherwise.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            with _addressable(self.path) as name:
                self.sock.connect(name)
        except OSError as exc:
            self.sock.close()
            raise PublishError(f"{self.path}: cannot reach the agent's publish socket ({exc.strerror or exc}); "
                               "is `tether run` running with [outbox] enabled?") from exc
        self._reader = self.sock.makefile("rb")

    @classmethod
    def for_config(cls, config: Config, timeout: float = 30.0) -> Publisher:
        return cls(socket_path(config), timeout)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int:
        """Queue one message; return its outbox id."""
        return self.publish_many([(topic, payload, qos)])[0]

    def publish_many(self, messages: Iterable[tuple[str, bytes | str, int]], chunk: int = 500) -> list[int]:
        """Queue messages in order, pipelined `chunk` at a time; return their ids. On the first
        refusal raise PublishError whose `queued` lists the ids queued before it."""
        import json  # the client's side: loaded by applications and `tether publish`, never by `tether run`

        ids: list[int] = []
        batch: list[bytes] = []
        for topic, payload, qos in messages:
            data = payload.encode() if isinstance(payload, str) else bytes(payload)
            batch.append(json.dumps({"topic": topic, "payload_b64": base64.b64encode(data).decode(),
                                     "qos": qos}).encode() + b"\n")
            if len(batch) >= chunk:
                self._exchange(batch, ids)
                batch = []
        if batch:
            self._exchange(batch, ids)
        return ids

    def _exchange(self, lines: list[bytes], ids: list[int]) -> None:
        import json  # see publish_many

        try:
            self.sock.sendall(b"".join(lines))
            replies = [self._reader.readline() for _ in lines]
        except OSError as exc:
            raise PublishError(f"{self.path}: connection to the agent lost ({exc}); messages without an "
                               "answer may or may not be queued", ids) from exc
        for reply in replies:
            try:
                answer = json.loads(reply)
            except ValueError:
                raise PublishError(f"{self.path}: the agent closed the connection or answered {reply[:80]!r}; "
                                   "messages without an answer may or may not be queued", ids) from None
            if not answer.get("ok"):
                raise PublishError(f"refused by the agent: {answer.get('error')}", ids)
            ids.append(int(answer["id"]))

    def close(self) -> None:
        self._reader.close()
        self.sock.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish_command(args: argparse.Namespace, config: Config) -> int:
    """`tether publish`: print the outbox id of each queued message."""
    if args.lines == (args.payload is not None):
        raise AgentError("give either a PAYLOAD or --lines (one message per line of stdin)")
    messages: Iterable[tuple[str, bytes | str, int]]
    if args.lines:
        messages = ((args.topic, line.rstrip(b"\n"), args.qos) for line in sys.stdin.buffer)
    else:
        messages = [(args.topic, args.payload, args.qos)]
    with Publisher.for_config(config) as publisher:
        try:
            ids = publisher.publish_many(messages)
        except PublishError as exc:
            print("\n".join(str(i) for i in exc.queued), end="\n" if exc.queued else "")
            raise
    print("\n".join(str(i) for i in ids))
    return 0
