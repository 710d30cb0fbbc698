"""The root of Tether's exception hierarchy and the hardware layer's errors.

`TetherError` lives here because `hal` is the bottom layer: `provisioning` and `agent` derive their
own errors from it, so a caller can catch everything Tether raises on purpose with one class.
"""

from __future__ import annotations


class TetherError(Exception):
    """An error Tether raises on purpose; the message says what, where and what to do."""


class HalError(TetherError):
    """A hardware-layer failure: key store, storage, boot slots."""


class StorageError(HalError):
    """State on disk could not be written or read (disk full, permissions, corrupt file)."""


class KeyStoreError(HalError):
    """A key could not be created, loaded or used."""
