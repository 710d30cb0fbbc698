"""The installed package's version, for `--version` on every command line.

Read from the distribution's metadata (the wheel, the .deb's venv, or an editable checkout) so the
version is written once, in pyproject.toml. `importlib.metadata` loads only when `--version` is asked.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

DISTRIBUTION = "tether"


def version() -> str:
    """The version of the installed `tether` distribution, or "unknown" when run from a bare checkout."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


class VersionAction(argparse.Action):
    """`--version`: print `<prog> <version>` and exit 0, looking the version up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the package version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()
