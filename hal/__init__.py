"""The device's hardware: where keys live (file, TPM 2.0), atomic storage, boot slots for OTA; and
the root of Tether's exception hierarchy.

Errors: `TetherError` lives here because `hal` is the bottom layer: `provisioning` and `agent` derive
their own errors from it, so a caller can catch everything Tether raises on purpose with one class.
The hardware layer's own errors (`HalError`, `StorageError`, `KeyStoreError`) are beside it. They were
`hal/errors.py` until issue 24's sixth round: every process that imports `hal` imports them, and a
module of its own cost each start ~0.2 M instructions and 13 system calls to find and load.

Backends are chosen by name from config, one registry per kind (`{"name": "module:Class"}`), each
imported only when chosen, so a device never imports a library for a backend it does not use:
`load_backend`, which hal/keys and hal/slots use (here rather than a module of its own, for the same
reason).
"""


from __future__ import annotations

import sys
from typing import Any


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


def load_backend(backends: dict[str, str], name: str, kind: str, error: type[HalError], hint: str = "") -> Any:
    """The class registered as `name`; `error` (naming the kind and the choices) when unknown or unloadable."""
    try:
        target = backends[name]
    except KeyError:
        raise error(f"{kind} backend {name!r} is unknown: expected one of {', '.join(sorted(backends))}") from None
    module_name, cls_name = target.split(":")
    try:
        __import__(module_name)  # importlib.import_module's work, without importing importlib (issue 24)
    except ImportError as exc:
        raise error(f"{kind} backend {name!r} cannot load: {exc}{hint}") from exc
    return getattr(sys.modules[module_name], cls_name)
