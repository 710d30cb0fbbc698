"""The root of Tether's exception hierarchy and the hardware layer's errors.

`TetherError` lives here because `hal` is the bottom layer: `provisioning` and `agent` derive their
own errors from it, so a caller can catch everything Tether raises on purpose with one class.
"""

from __future__ import annotations


class TetherError(Exception):
    """An error Tether raises on purpose; the message says what, where and what to do.

    `retryable` says whether the same operation can succeed later without anyone changing anything
    (a network error, a busy server, a full disk): loops decide their retries by it, never by the
    message text. Subclasses set it per class or per instance.
    """

    retryable: bool = False


class HalError(TetherError):
    """A hardware-layer failure: key store, storage, boot slots."""


class StorageError(HalError):
    """State on disk could not be written or read (disk full, permissions, corrupt file)."""

    retryable = True  # a full disk is freed, a remounted file system comes back


class KeyStoreError(HalError):
    """A key could not be created, loaded or used."""
