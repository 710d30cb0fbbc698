"""Backends chosen by name from config: one registry per kind (`{"name": "module:Class"}`), imported
only when chosen, so a device never imports a library for a backend it does not use."""

from __future__ import annotations

import sys
from typing import Any

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
