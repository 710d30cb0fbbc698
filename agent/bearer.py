"""`Authorization: Bearer <jwt>` for the device's HTTP calls (OTA release files and payload).

A token can expire between two requests, or the platform can stop accepting it before its `exp`: an
HTTP 401 makes `Bearer.send` ask the token component for a fresh token once (over MQTT, through the
token service: `TokenService.force_refresh`) and send the same request again with it. A second 401 is
handed back to the caller, who names the host and gives up: the token is not the problem then.
No HTTP library is imported here; the caller's `send` does the I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

log = logging.getLogger(__name__)
Response = TypeVar("Response")


class Sent(NamedTuple, Generic[Response]):
    """What `Bearer.send` got back: the last response, and whether a fresh token was fetched for it."""

    response: Response
    refreshed: bool


class Bearer:
    """The device token as HTTP calls use it: `current()` now, `refresh()` after a 401 (may block while
    the token service answers; None when no fresh token came)."""

    def __init__(self, current: Callable[[], str | None],
                 refresh: Callable[[], str | None] | None = None) -> None:
        self.current = current
        self._refresh = refresh

    @property
    def can_refresh(self) -> bool:
        return self._refresh is not None

    def send(self, send: Callable[[str | None], Response], status: Callable[[Response], int],
             close: Callable[[Response], None], what: str = "request") -> Sent[Response]:
        """`send(token)` with the current token; on a 401, `close` that response, refresh once and
        `send` again with the fresh token. Returns the last response: a second 401, or the first one
        when no fresh token came (`refreshed` False), is for the caller to report."""
        response = send(self.current())
        if status(response) != 401 or self._refresh is None:
            return Sent(response, False)
        log.info("HTTP 401 for %s: asking for a fresh token and sending it again once", what)
        fresh = self._refresh()
        if not fresh:
            log.warning("HTTP 401 for %s and no fresh token came from the token service", what)
            return Sent(response, False)
        close(response)
        return Sent(send(fresh), True)
