"""Errors of the OTA updater. Every message is fit to be the `502` reason the platform shows."""

from __future__ import annotations

from agent.errors import AgentError


class OtaError(AgentError):
    """An update failed; `retryable` says whether the same request can succeed later (network) or not."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class DownloadError(OtaError):
    """The manifest or payload could not be fetched (HTTP status, TLS, stall, dropped connection)."""


class VerificationError(OtaError):
    """The release is not acceptable: size, SHA-256, signature, name, version or anti-rollback."""


class TransitionError(OtaError):
    """An event that the OTA state machine does not accept in its current state (a bug, not bad input)."""
