"""The device's hardware: where keys live (file, TPM 2.0), atomic storage, boot slots for OTA.

Backends are chosen by name from config, one registry per kind (`{"name": "module:Class"}`), each
imported only when chosen, so a device never imports a library for a backend it does not use:
`load_backend`, which hal/keys and hal/slots use (here rather than a module of its own: every start
imports this package anyway, and a module costs ~0.35 M instructions to find and load, issue 24).
"""


from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hal.errors import HalError


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
