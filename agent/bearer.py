"""`Authorization: Bearer <jwt>` for the device's HTTP calls (OTA downloads, EST with Cumulocity's CA).

On an HTTP 401 the token is refreshed once (over MQTT, through the token service) and the request
is sent again; a second 401 is returned to the caller. Imports `requests` only where it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def bearer_auth(current: Callable[[], str | None], refresh: Callable[[], str | None]) -> Any:
    """A `requests` auth object: `session.auth = bearer_auth(tokens.current, tokens.force_refresh)`."""
    import requests

    class BearerAuth(requests.auth.AuthBase):
        def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
            token = current()
            if token:
                request.headers["Authorization"] = f"Bearer {token}"
            request.register_hook("response", self._retry_once_on_401)
            return request

        def _retry_once_on_401(self, response: requests.Response, **kwargs: Any) -> requests.Response:
            if response.status_code != 401 or getattr(response.request, "_tether_retried", False):
                return response
            log.info("HTTP 401 from %s: refreshing the token and retrying once", response.url)
            token = refresh()
            if not token:
                return response
            response.content  # noqa: B018 (drain the body so the connection can be reused)
            response.close()
            retry = response.request.copy()
            retry.headers["Authorization"] = f"Bearer {token}"
            retry._tether_retried = True  # type: ignore[attr-defined]
            connection = response.connection
            new = connection.send(retry, **kwargs)
            new.history.append(response)
            new.request = retry
            return new  # type: ignore[no-any-return]

    return BearerAuth()
