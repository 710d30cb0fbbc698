"""Errors of the provisioning station."""

from __future__ import annotations

from provisioning import ProvisioningError


class StationError(ProvisioningError):
    """A station operation failed: missing or bad CA material, ledger, configuration."""


class Refusal(StationError):
    """An EST request the station refuses; `status` is the HTTP status, the message is the body.

    401 carries `WWW-Authenticate` (RFC 9110 11.6.1) so a client knows which scheme to use.
    """

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after  # seconds, sent as Retry-After (429, 503)

    @property
    def headers(self) -> dict[str, str]:
        headers = {}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="tether-station", charset="UTF-8"'
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers
