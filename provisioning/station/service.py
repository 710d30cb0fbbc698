"""`tether-station serve`'s options as a service reads them: /etc/tether/station.toml's [serve] table.

Not to be confused with DIR/station.toml, the station directory's own settings (trust domain, lifetimes,
ledger) that `init` writes: this file says how the service runs the station (where the directory is,
which addresses it listens on, how many workers). The Debian package installs a commented one and the
unit runs `tether-station serve --config /etc/tether/station.toml`.

Precedence: a command-line option, then the file, then `DEFAULTS` (the one place a default lives).
Every error names the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.station.errors import StationError

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServeSettings:
    dir: str | None = None                 # the station directory (`init --dir`); else $TETHER_STATION_DIR
    listen: str = "127.0.0.1:8443"
    workers: int = 0                       # 0: one per CPU
    threads: int = 0                       # 0: the loop computes, a commit thread per worker (see pool_threads)
    request_timeout: float = 10.0
    idle_timeout: float = 5.0
    max_per_client: int = 64
    max_connections: int = 2048
    handshake_cpu: float = 0.1
    log_level: str = "info"
    console: str | None = None             # HOST:PORT, off when unset
    console_remote: bool = False
    console_max_connections: int = 128
    metrics: str | None = None             # HOST:PORT on loopback, off when unset
    metrics_expiring_days: int = 30
    db: str | None = None                  # ledger URL or path; else DIR/station.toml's
    passphrase_file: str | None = None     # the CA key's passphrase, when init was given one

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


DEFAULTS = ServeSettings()
_FIELDS = {f.name: f for f in dataclasses.fields(ServeSettings)}


def _expected(name: str) -> tuple[type, ...]:
    default = getattr(DEFAULTS, name)
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, float):
        return (int, float)
    if isinstance(default, int):
        return (int,)
    return (str,)


def load(path: str | Path) -> dict[str, Any]:
    """The [serve] table of `path`, checked: {option: value} for the keys it sets."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StationError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StationError(f"{path}: cannot read it: {exc}") from None
    unknown = sorted(set(data) - {"serve"})
    if unknown:
        raise StationError(f"{path}: unknown table or key {unknown[0]!r}: expected only [serve]")
    table = data.get("serve", {})
    if not isinstance(table, dict):
        raise StationError(f"{path}: serve must be a table ([serve])")
    found: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise StationError(f"{path}: [serve] {key}: unknown key; expected one of {', '.join(sorted(_FIELDS))}")
        types = _expected(name)
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise StationError(f"{path}: [serve] {key} = {value!r}: expected {' or '.join(t.__name__ for t in types)}")
        if name == "log_level" and value not in LOG_LEVELS:
            raise StationError(f"{path}: [serve] log_level = {value!r}: expected one of {', '.join(LOG_LEVELS)}")
        found[name] = float(value) if float in types and isinstance(value, int | float) else value
    return found


def threads_chosen(given: dict[str, Any], path: str | Path | None) -> bool:
    """True when `threads` was given on the command line or in the file at `path` (not defaulted)."""
    return given.get("threads") is not None or (bool(path) and "threads" in load(path))  # type: ignore[arg-type]


def resolve(given: dict[str, Any], path: str | Path | None) -> ServeSettings:
    """The settings `serve` runs with: `given` (command-line options, None where not given) over the file at
    `path` (when given) over DEFAULTS."""
    values = load(path) if path else {}
    values.update({k: v for k, v in given.items() if k in _FIELDS and v is not None})
    return dataclasses.replace(DEFAULTS, **values)
