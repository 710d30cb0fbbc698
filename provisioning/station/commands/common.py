"""What every `tether-station` sub-command shares: the station directory, its passphrase, the clock and
output helpers."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hal import storage
from provisioning.station.errors import StationError

if TYPE_CHECKING:
    from provisioning.station.ca import Station

Handler = Callable[[argparse.Namespace], int]


def passphrase(args: argparse.Namespace) -> bytes | None:
    """The first line of --passphrase-file (or $TETHER_STATION_PASSPHRASE_FILE); None when neither is set."""
    path = args.passphrase_file or os.environ.get("TETHER_STATION_PASSPHRASE_FILE")
    if not path:
        return None
    data = storage.read_bytes(path)
    if data is None or not data.strip():
        raise StationError(f"{path}: passphrase file missing or empty")
    return data.splitlines()[0].strip()


def station_dir(args: argparse.Namespace) -> Path:
    """--dir, else $TETHER_STATION_DIR; StationError when neither is given."""
    directory = args.dir or os.environ.get("TETHER_STATION_DIR")
    if not directory:
        raise StationError("no station directory: pass --dir DIR or set TETHER_STATION_DIR")
    return Path(directory)


def open_station(args: argparse.Namespace) -> Station:
    """The station in --dir, its keys unlocked with the passphrase (cryptography loads here, on demand)."""
    from provisioning.station.ca import Station

    return Station(station_dir(args), passphrase(args))


def unix_now() -> int:
    return int(time.time())


def iso(ts: int | None) -> str:
    """A Unix time as `YYYY-MM-DDTHH:MM:SSZ`, or `-` for None."""
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_out(path: str | None, data: bytes, mode: int = storage.PUBLIC_MODE) -> None:
    """Write `data` atomically to `path`, or to stdout for None or `-`."""
    if path and path != "-":
        storage.atomic_write(path, data, mode)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def cli_who() -> str:
    """The audit trail's name for whoever runs the command line."""
    import getpass
    import socket

    return f"cli {getpass.getuser()}@{socket.gethostname()}"
