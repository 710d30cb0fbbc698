"""`tether-station`: the factory station's command line. Thin: parse, call the module that owns it, print.

Every command takes `--dir DIR` (default $TETHER_STATION_DIR) and, when the CA keys are encrypted,
`--passphrase-file F` (default $TETHER_STATION_PASSPHRASE_FILE). Exit status: 0 success, 1 a
Tether error (message on stderr), 2 usage error. The sub-commands live in `commands/`, one module per
concern, each adding its parsers and returning its handlers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hal import TetherError
from hal.about import VersionAction
from provisioning.station.commands import attest, issuing, operators, records, serve
from provisioning.station.commands.common import Handler

# in the order `--help` lists them
COMMAND_MODULES = (issuing, serve, records, attest, operators)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The parser and every handler by command name (`ledger list`, `serve`, ...)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", help="station directory (default: $TETHER_STATION_DIR)")
    common.add_argument("--passphrase-file", help="file whose first line decrypts (or, at init, encrypts) "
                        "the CA keys (default: $TETHER_STATION_PASSPHRASE_FILE)")
    common.add_argument("--db", help="ledger: postgresql://... URL or SQLite path (default: station.toml)")
    parser = argparse.ArgumentParser(prog="tether-station", description="Tether factory provisioning station: "
                                     "CA, EST enrollment server, issuance ledger, one-time passwords.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    for module in COMMAND_MODULES:
        handlers.update(module.add_commands(sub, common))
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    name = args.command + (f" {args.sub}" if getattr(args, "sub", None) else "")
    try:
        return handlers[name](args)
    except TetherError as exc:
        print(f"tether-station: error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:  # `release` before provisioning/release.py exists, or a missing extra
        print(f"tether-station: error: {name} is unavailable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
