"""`tether ota status [--json]`: installed version, pending update, progress and slot states.

agent/cli.py lists `add_ota_commands` in its EXTENSIONS: it adds the parser and returns the handler
by command name, so this module never imports the CLI that imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from agent.ota.status import read_status

BAR_WIDTH = 30


def add_ota_commands(subparsers: Any) -> dict[str, Callable[[argparse.Namespace, Any], int]]:
    """Add `ota status` to the `tether` sub-command parser; return its handler by command name."""
    ota = subparsers.add_parser("ota", help="over-the-air updates").add_subparsers(dest="sub", required=True)
    p = ota.add_parser("status", help="installed version, pending update, progress and slots")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    return {"ota status": cmd_ota_status}


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[#######.......]  45%  12.3/27.0 MB` for a terminal."""
    fraction = min(1.0, done / total) if total else 0.0
    filled = int(fraction * width)
    return (f"[{'#' * filled}{'.' * (width - filled)}] {int(fraction * 100):3d}%  "
            f"{done / 1e6:.1f}/{total / 1e6:.1f} MB")


def render(status: dict[str, Any], tty: bool) -> str:
    """Human-readable status; a progress bar while downloading when `tty`."""
    inst = status["installed"]
    lines = [f"installed:  {inst['name'] or '(base image)'} {inst['version']} (anti-rollback floor {inst['floor']})",
             f"state:      {status['state']}" + ("" if status["reported"] else " (not yet reported)")]
    op = status["operation"]
    if op:
        lines.append(f"operation:  {op['name']} {op['version']} from {op['url']}")
    prog = status["progress"]
    if status["state"] in ("downloading", "verifying") and prog["size"]:
        lines.append("progress:   " + (progress_bar(prog["bytes"], prog["size"]) if tty
                                       else f"{prog['bytes']}/{prog['size']} bytes ({prog['percent']}%)"))
    if status["reason"]:
        lines.append(f"reason:     {status['reason']}")
    slots = status.get("slots") or {}
    if "error" in slots:
        lines.append(f"slots:      {slots['error']}")
    elif slots:
        versions = ", ".join(f"{k}={v or '-'}" for k, v in slots.get("versions", {}).items())
        lines.append(f"slots:      {slots['backend']}, active {slots['active']}"
                     f"{' (on trial)' if slots.get('trial') else ''}; versions {versions}")
    return "\n".join(lines)


def cmd_ota_status(args: argparse.Namespace, config: Any) -> int:
    status = read_status(config)
    if args.json:
        print(json.dumps(status, indent=1, sort_keys=True))
    else:
        print(render(status, sys.stdout.isatty()))
    return 0
