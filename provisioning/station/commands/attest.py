"""`tether-station attest allow|list|remove`: the EK allow-list of attested enrollment.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hal import storage
from provisioning.station.commands.common import Handler, iso, open_station, unix_now
from provisioning.station.errors import StationError


def _ek_digests(args: argparse.Namespace) -> list[str]:
    import re

    from provisioning.attest.verify import ek_digest
    from provisioning.certs import load_certificates

    digests = []
    for value in args.digest:
        text = value.strip().lower()
        text = text if text.startswith("sha256:") else f"sha256:{text}"
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", text):
            raise StationError(f"EK digest {value!r}: expected sha256:<64 hex digits> (the SHA-256 of the EK's "
                               "SubjectPublicKeyInfo, as `tether-station ledger list` and the console show it)")
        digests.append(text)
    for path in args.ek_cert or []:
        data = storage.read_bytes(path)
        if data is None:
            raise StationError(f"{path}: no such EK certificate file")
        digests += [ek_digest(c) for c in load_certificates(data, path)]
    if not digests:
        raise StationError("name at least one EK: a digest or --ek-cert FILE")
    return digests


@contextmanager
def _attest_store(args: argparse.Namespace) -> Iterator[Any]:
    """The EK allow-list in the station's ledger, closed when the block ends."""
    from provisioning.station.attest_store import AttestStore

    with open_station(args).open_ledger(args.db) as ledger:
        yield AttestStore(ledger)


def cmd_attest_allow(args: argparse.Namespace) -> int:
    digests = _ek_digests(args)
    if args.device and len(digests) != 1:
        raise StationError(f"--device binds one EK to one device id; {len(digests)} EKs given")
    with _attest_store(args) as store:
        store.allow([(d, args.device) for d in digests], args.batch, unix_now())
    for digest in digests:
        print(f"allowed {digest} (batch {args.batch}{', device ' + args.device if args.device else ''})")
    return 0


def cmd_attest_list(args: argparse.Namespace) -> int:
    with _attest_store(args) as store:
        rows = store.allow_list(args.batch)
    for row in rows:
        print(f"{row.ek_digest}  {row.batch}  {row.device_id or '-'}  {iso(row.added_at)}")
    return 0


def cmd_attest_remove(args: argparse.Namespace) -> int:
    if bool(args.digest) == bool(args.batch):
        raise StationError("name one EK digest or --batch NAME")
    with _attest_store(args) as store:
        digest = _ek_digests(argparse.Namespace(digest=[args.digest], ek_cert=None))[0] if args.digest else None
        n = store.disallow(digest, args.batch)
    if n == 0:
        raise StationError(f"nothing to remove: {args.digest or 'batch ' + args.batch} is not on the EK allow-list")
    print(f"removed {n} EK(s) from the allow-list")
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Handler]:
    """Add these sub-commands' parsers to `sub`; their handlers by command name."""
    attest = sub.add_parser("attest", help="attested enrollment: the EK allow-list (station.toml ek_allowlist)"
                            ).add_subparsers(dest="sub", required=True)
    p = attest.add_parser("allow", parents=[common], help="register EKs (by digest or EK certificate) for a batch")
    p.add_argument("digest", nargs="*", metavar="DIGEST", help="sha256:<hex> of the EK's public key")
    p.add_argument("--ek-cert", action="append", metavar="FILE", help="an EK certificate (PEM or DER; repeat)")
    p.add_argument("--batch", required=True, help="the batch the EKs belong to")
    p.add_argument("--device", metavar="ID", help="the one device id this EK may enroll")
    p = attest.add_parser("list", parents=[common], help="list the EK allow-list")
    p.add_argument("--batch")
    p = attest.add_parser("remove", parents=[common], help="remove one EK, or a whole batch, from the allow-list")
    p.add_argument("digest", nargs="?", metavar="DIGEST")
    p.add_argument("--batch")
    p.set_defaults(ek_cert=None)
    return {
        "attest allow": cmd_attest_allow,
        "attest list": cmd_attest_list,
        "attest remove": cmd_attest_remove,
    }
