"""`tether-station otp`, `ledger`, `revoke`, `readmit`, `crl`, `export`, `backup`, `restore`: the ledger's
records and what is made from them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from provisioning.identity import check_device_id
from provisioning.station.backup import backup, restore
from provisioning.station.commands.common import Handler, iso, open_station, station_dir, unix_now, write_out
from provisioning.station.errors import StationError
from provisioning.station.ledger import KINDS, REASONS
from provisioning.station.otp import new_otp, otp_hash


def cmd_otp(args: argparse.Namespace) -> int:
    station = open_station(args)
    device_id = check_device_id(args.device_id, "DEVICE_ID", station.settings.reserved)
    ttl = args.ttl if args.ttl is not None else station.settings.otp_ttl
    if ttl <= 0:
        raise StationError(f"--ttl {ttl}: must be a positive number of seconds")
    otp = new_otp()
    with station.open_ledger(args.db) as ledger:
        now = unix_now()
        ledger.add_otp(device_id, otp_hash(device_id, otp), now, now + ttl)
    print(otp)  # stdout carries only the password: factory scripts capture it
    print(f"one-time password for {device_id}, valid until {iso(now + ttl)} (it admits the device again after "
          "a revocation; passwords issued before a revocation stay void)", file=sys.stderr)
    return 0


def cmd_ledger_list(args: argparse.Namespace) -> int:
    station = open_station(args)
    with station.open_ledger(args.db) as ledger:
        rows = ledger.rows(args.kind)
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=1))
        return 0
    print(f"{'serial':<42} {'device':<24} {'kind':<6} {'not after':<20} {'issued at':<20} revoked at")
    for r in rows:
        print(f"{r.serial:<42} {r.device_id:<24} {r.kind:<6} {iso(r.not_after):<20} {iso(r.issued_at):<20} "
              f"{iso(r.revoked_at)}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    if (args.serial is None) == (args.device is None):
        raise StationError("revoke: give either a SERIAL or --device ID (not both)")
    station = open_station(args)
    with station.open_ledger(args.db) as ledger:
        if args.device is not None:
            rows = ledger.revoke_device(args.device, unix_now(), args.reason)
        else:
            rows = ledger.revoke(args.serial, unix_now(), args.reason)
    for row in rows:
        inherited = f", issued from {row.predecessor}" if row.predecessor else ""
        print(f"revoked serial {row.serial} ({row.subject}{inherited}): {row.revoke_reason}")
    print(f"{len(rows)} certificate(s) revoked; publish a new CRL: tether-station crl --out FILE", file=sys.stderr)
    for device_id in sorted({r.device_id for r in rows if r.kind == "device"}):
        print(f"device {device_id} is barred: neither its bootstrap certificate nor a one-time password issued "
              f"before now enrolls it; admit it again with `tether-station otp {device_id}` (a new password) or "
              f"`tether-station readmit {device_id}` (its bootstrap certificate)", file=sys.stderr)
    return 0


def cmd_readmit(args: argparse.Namespace) -> int:
    station = open_station(args)
    with station.open_ledger(args.db) as ledger:
        bar = ledger.readmit(args.device_id)
    print(f"device {bar.device_id} readmitted: its bootstrap certificate enrolls it again (barred since "
          f"{iso(bar.barred_at)}, {bar.reason}); passwords issued before the revocation stay void")
    return 0


def cmd_ledger_barred(args: argparse.Namespace) -> int:
    station = open_station(args)
    with station.open_ledger(args.db) as ledger:
        bars = ledger.bars()
    if args.json:
        print(json.dumps([{"device_id": b.device_id, "barred_at": b.barred_at, "reason": b.reason} for b in bars],
                         indent=1))
        return 0
    print(f"{'device':<24} {'barred at':<20} reason")
    for b in bars:
        print(f"{b.device_id:<24} {iso(b.barred_at):<20} {b.reason}")
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    station = open_station(args)
    with station.open_ledger(args.db) as ledger:
        crl = station.ledger_crl(ledger, unix_now(), args.days)  # the console's export calls the same
    write_out(args.out, crl.public_bytes(Encoding.DER if args.format == "der" else Encoding.PEM))
    print(f"CRL with {len(crl)} revoked certificate(s), next update {crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}",
          file=sys.stderr)
    return 0


def cmd_export_c8y(args: argparse.Namespace) -> int:
    from provisioning.station.export import c8y_bulk_csv

    station = open_station(args)
    with station.open_ledger(args.db) as ledger:
        text = c8y_bulk_csv(ledger.rows("device"), args.type, args.id_type)
    write_out(args.out, text.encode())
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    station = open_station(args)
    result = backup(station.directory, args.db or station.settings.ledger, Path(args.out))
    ledger = "and a copy of the SQLite ledger" if result.ledger == "sqlite" else "(not the ledger)"
    print(f"backed up {result.files} file(s) of {station.directory} {ledger} to {result.archive} (mode 0600: "
          "it holds the CA keys)")
    if result.postgres_hint:
        print(f"tether-station: {result.postgres_hint}", file=sys.stderr)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    written, aside = restore(Path(args.archive), station_dir(args), force=args.force)
    print(f"restored {written} file(s) into {station_dir(args)}")
    if aside is not None:
        print(f"the directory that was there is kept as {aside}", file=sys.stderr)
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Handler]:
    """Add these sub-commands' parsers to `sub`; their handlers by command name."""
    p = sub.add_parser("otp", parents=[common], help="print a one-time password for a device's first enrollment")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--ttl", type=int, help="seconds until it expires (default: station.toml otp_ttl, 1 day)")
    ledger = sub.add_parser("ledger", help="issued certificates").add_subparsers(dest="sub", required=True)
    p = ledger.add_parser("list", parents=[common], help="list issued certificates")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kind", choices=KINDS)
    p = sub.add_parser("revoke", parents=[common], help="revoke a certificate by serial (hex) and every "
                       "certificate re-enrolled from it, or all of a device's certificates")
    p.add_argument("serial", metavar="SERIAL", nargs="?")
    p.add_argument("--device", metavar="ID", help="revoke every certificate of this device")
    p.add_argument("--reason", default="unspecified", choices=REASONS, help="CRL reason (default unspecified)")
    p = ledger.add_parser("barred", parents=[common], help="list devices an operator revoked and has not "
                          "admitted again")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("readmit", parents=[common], help="let a revoked device's bootstrap certificate enroll it "
                       "again (a new `otp` admits it by password instead)")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p = sub.add_parser("crl", parents=[common], help="write a CRL signed by the issuing CA")
    p.add_argument("--out", help="file (default: stdout)")
    p.add_argument("--format", choices=("pem", "der"), default="pem")
    p.add_argument("--days", type=int, help="validity (default: station.toml crl_days)")
    export = sub.add_parser("export", help="exports").add_subparsers(dest="sub", required=True)
    p = export.add_parser("c8y-bulk", parents=[common], help="Cumulocity bulk registration CSV (certificates)")
    p.add_argument("--out", help="file (default: stdout)")
    p.add_argument("--type", default="c8y_Device", help="TYPE column")
    p.add_argument("--id-type", default="c8y_Serial", help="IDTYPE column")
    p = sub.add_parser("backup", parents=[common], help="archive the station directory and its SQLite ledger "
                       "(online; for PostgreSQL it prints the pg_dump to run)")
    p.add_argument("--out", required=True, help="archive to write (.tar.gz, mode 0600)")
    p = sub.add_parser("restore", parents=[common], help="restore a backup archive into --dir (empty or new)")
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("--force", action="store_true", help="restore over a non-empty --dir, which is set aside as "
                   "DIR.before-restore-TIME (never deleted)")
    return {
        "otp": cmd_otp,
        "ledger list": cmd_ledger_list,
        "revoke": cmd_revoke,
        "readmit": cmd_readmit,
        "ledger barred": cmd_ledger_barred,
        "crl": cmd_crl,
        "export c8y-bulk": cmd_export_c8y,
        "backup": cmd_backup,
        "restore": cmd_restore,
    }
