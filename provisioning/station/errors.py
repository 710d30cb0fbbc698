"""Errors of the provisioning station."""

from __future__ import annotations

from provisioning.errors import ProvisioningError


class StationError(ProvisioningError):
    """A station operation failed: missing or bad CA material, ledger, configuration."""


class Refusal(StationError):
    """An EST request the station refuses; `status` is the HTTP status, the message is the body.

    401 carries `WWW-Authenticate` (RFC 9110 11.6.1) so a client knows which scheme to use.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"WWW-Authenticate": 'Basic realm="tether-station", charset="UTF-8"'}
        return {}
