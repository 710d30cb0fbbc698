"""The one TOML writer: the device's configuration files (`tether config show|set`, the lab's and the
tests' device configs) and the station's `station.toml` are all rendered here.

It lives in `provisioning` because both the agent and the station import this layer and the station
never imports `agent`. It writes only what our files hold (strings, integers, floats, booleans, lists
of those, one level of tables) and escapes strings as TOML 1.0 basic strings, so whatever a value
holds reads back unchanged with `tomllib`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# TOML 1.0 "Basic strings": these have short escapes; every other control character is \uXXXX
_SHORT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def format_string(text: str) -> str:
    """`text` as a TOML basic string: quotes, backslashes and control characters (U+0000-U+001F, U+007F)
    escaped, everything else kept as is."""
    out = []
    for ch in text:
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def format_key(key: str) -> str:
    """A bare key when TOML allows one (`A-Za-z0-9_-`), a quoted key otherwise."""
    return key if _BARE_KEY.fullmatch(key) else format_string(key)


def format_value(value: Any) -> str:
    """TOML rendering of one value; TypeError for a type our files never hold (a table, a date, None)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back as the same float, always with '.' or 'e'
    if isinstance(value, str):
        return format_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def render_pairs(values: Mapping[str, Any]) -> str:
    """`key = value` lines, one per entry."""
    return "".join(f"{format_key(k)} = {format_value(v)}\n" for k, v in values.items())


def to_toml(sections: Mapping[str, Mapping[str, Any]], comment: str = "") -> str:
    """TOML text for `{section: {key: value}}`, with an optional leading comment line."""
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    for name, values in sections.items():
        text += f"\n[{format_key(name)}]\n" + render_pairs(values)
    return text
