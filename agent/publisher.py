"""The local publish API's client: a device application's handle on the agent's outbox, and `tether publish`.

The wire format and the server inside `tether run` are agent.publish_api; this side is loaded by
applications and by the `publish` command only, so the agent's start-up never unmarshals it (issue 24).
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from agent.config import Config
from agent.errors import AgentError
from agent.publish_api import addressable, socket_path

if TYPE_CHECKING:
    import argparse  # `tether publish`'s arguments; argparse itself loads only for that command (issue 24)


class PublishError(AgentError):
    """The agent refused a message or could not be reached. `queued` holds the ids of the messages
    of the same call that were queued before the failure."""

    def __init__(self, message: str, queued: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.queued = list(queued)



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
            with addressable(self.path) as name:
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
