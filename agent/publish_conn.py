"""The publish API's side of one application's connection: request lines parsed, queued, answered.

The wire format is agent.publish_api's; this module is loaded with the first connection an
application makes, so `tether run` starts without it, and without `json` (issue 24).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import socket
from collections.abc import Sequence
from typing import Any

from agent.outbox import OutboxError

log = logging.getLogger("tether.outbox")
MAX_LINE = 4 << 20   # a base64 line for a ~3 MiB payload; longer lines close the connection


def serve(conn: socket.socket, outbox: Any) -> None:
    """Answer one application's connection until it closes: one reply per request line, in order."""
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
            replies = handle(outbox, [line for line in lines if line.strip()])
            if len(buffer) > MAX_LINE:
                replies.append({"ok": False, "error": f"request line longer than {MAX_LINE} bytes"})
            try:
                if replies:
                    conn.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in replies))
            except OSError:
                return
            if len(buffer) > MAX_LINE:
                return


def handle(outbox: Any, lines: Sequence[bytes]) -> list[dict[str, Any]]:
    """One reply per request line, in order; the well-formed ones are queued together."""
    parsed: list[tuple[str, bytes, int] | str] = [parse(line) for line in lines]
    items = [p for p in parsed if not isinstance(p, str)]
    try:
        results = iter(outbox.publish_many(items) if items else [])
    except OutboxError as exc:
        log.warning("publish API: %s", exc)
        return [{"ok": False, "error": p if isinstance(p, str) else str(exc)} for p in parsed]
    replies = []
    for p in parsed:
        result = p if isinstance(p, str) else next(results)
        replies.append({"ok": True, "id": result} if isinstance(result, int) else
                       {"ok": False, "error": str(result)})
    return replies


def parse(line: bytes) -> tuple[str, bytes, int] | str:
    """(topic, payload, qos) from one request line, or the reason it is not a request."""
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
