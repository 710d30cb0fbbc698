"""`tether-station operator add|revoke|list`: the console's operators (client certificates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hal import storage
from provisioning.station.commands.common import Handler, cli_who, iso, open_station, unix_now
from provisioning.station.errors import StationError


def cmd_operator_add(args: argparse.Namespace) -> int:
    from provisioning.station.console.operators import add_operator
    from provisioning.station.console.store import ADMIN, ConsoleStore

    station = open_station(args)
    password = None
    if args.p12_passphrase_file:
        data = storage.read_bytes(args.p12_passphrase_file)
        if data is None or not data.strip():
            raise StationError(f"--p12-passphrase-file {args.p12_passphrase_file}: missing or empty")
        password = data.decode().splitlines()[0].strip()
    with station.open_ledger(args.db) as ledger:
        store = ConsoleStore(ledger)
        issued = add_operator(station, store, args.name, args.role, Path(args.out), unix_now(), password)
        store.audit(cli_who(), "operator add", f"{issued.name} ({issued.role}), serial {issued.serial}", "cli",
                    ADMIN)
    print(f"operator {issued.name} ({issued.role}), serial {issued.serial}: "
          f"{', '.join(str(f) for f in issued.files)}", file=sys.stderr)
    if not password:
        print(f"PKCS#12 password (shown once): {issued.p12_password}")
    return 0


def cmd_operator_revoke(args: argparse.Namespace) -> int:
    from provisioning.station.console.store import ADMIN, ConsoleStore

    station = open_station(args)
    with station.open_ledger(args.db) as ledger:
        store = ConsoleStore(ledger)
        revoked = store.revoke_operator(args.name, unix_now())
        store.audit(cli_who(), "operator revoke", f"{args.name}: serial(s) {', '.join(o.serial for o in revoked)}",
                    "cli", ADMIN)
    print(f"revoked {len(revoked)} console certificate(s) of operator {args.name}")
    return 0


def cmd_operator_list(args: argparse.Namespace) -> int:
    from provisioning.station.console.store import ConsoleStore

    station = open_station(args)
    with station.open_ledger(args.db) as ledger:
        operators = ConsoleStore(ledger).operators()
    print(f"{'name':<20} {'role':<9} {'serial':<42} {'not after':<20} revoked at")
    for o in operators:
        print(f"{o.name:<20} {o.role:<9} {o.serial:<42} {iso(o.not_after):<20} {iso(o.revoked_at)}")
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Handler]:
    """Add these sub-commands' parsers to `sub`; their handlers by command name."""
    op = sub.add_parser("operator", help="console operators (client certificates)").add_subparsers(
        dest="sub", required=True)
    p = op.add_parser("add", parents=[common], help="issue a console certificate: NAME.p12 for the browser")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--role", choices=("admin", "readonly"), default="readonly", help="default readonly")
    p.add_argument("--out", required=True, help="directory for NAME.p12, NAME.pem, NAME.key, station-ca.pem")
    p.add_argument("--p12-passphrase-file", help="encrypt NAME.p12 with this file's first line (default: a new "
                   "random password, printed once)")
    p = op.add_parser("revoke", parents=[common], help="revoke every console certificate of NAME")
    p.add_argument("name", metavar="NAME")
    op.add_parser("list", parents=[common], help="list console operators")
    return {
        "operator add": cmd_operator_add,
        "operator revoke": cmd_operator_revoke,
        "operator list": cmd_operator_list,
    }
