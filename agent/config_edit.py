"""`tether config show`, `get` and `set`: the effective configuration as TOML, and one setting read or
recorded in a drop-in.

Loaded by those commands only: `tether run` reads its configuration with agent.config and never
writes it, so it does not unmarshal this (issue 24).
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from agent.config import SECTIONS, Config, ConfigError, field_hints, load, read_toml
from hal import storage
from provisioning.tomlfmt import to_toml


def render(config: Config) -> str:
    """The effective configuration as TOML (`tether config show`), written by the one TOML writer."""
    return to_toml(config.as_dict(), f"effective configuration from: {', '.join(config.sources)}")


SET_FILE = "99-set-by-tether.toml"


def _split_key(dotted: str) -> tuple[str, str]:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or key not in field_hints(section):
        raise ConfigError(f"{dotted!r} is not a configuration key (use section.key, e.g. keys.backend; "
                          "`tether config show` lists them)")
    return section, key


def get_value(config: Config, dotted: str) -> Any:
    section, key = _split_key(dotted)
    return getattr(getattr(config, section), key)


def set_value(base: str, dotted: str, text: str) -> str:
    """Record `section.key = text` in the base file's `config.d/99-set-by-tether.toml` drop-in.

    A drop-in keeps the base file (often part of the device image) and its comments untouched.
    The value is parsed as TOML when it is a TOML literal, as a string otherwise, and the result is
    validated by loading the whole configuration before the drop-in is replaced.
    """
    section, key = _split_key(dotted)
    try:
        value: Any = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    hint = field_hints(section)[key]
    if hint is str and not isinstance(value, str):
        value = text
    directory = os.path.join(os.path.dirname(base), "config.d")
    target = os.path.join(directory, SET_FILE)
    current = read_toml(target) if os.path.exists(target) else {}
    current.setdefault(section, {})[key] = value
    body = to_toml(current, "written by `tether config set`; later files in config.d/ override it")
    storage.ensure_dir(directory, 0o755)
    old = storage.read_bytes(target)
    storage.atomic_write(target, body.encode(), 0o644)
    try:
        load(base)
    except ConfigError:
        if old is None:
            storage.remove(target)
        else:
            storage.atomic_write(target, old, 0o644)
        raise
    return target
