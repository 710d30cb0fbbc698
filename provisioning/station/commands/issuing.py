"""`tether-station init`, `cloud`, `sign`, `issue`, `server-cert`, `release`: the CA and what it signs
offline (certificates for boards and brokers, cloud proofs of possession, OTA release manifests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from hal import KeyStoreError, storage
from hal.keys.file import generate
from provisioning import PolicyError, ProvisioningError
from provisioning.identity import check_device_id
from provisioning.station.commands.common import Handler, open_station, passphrase, station_dir, unix_now, write_out
from provisioning.station.errors import StationError


def cmd_init(args: argparse.Namespace) -> int:
    from provisioning.station.ca import init_station

    ca_import = tuple(Path(p) for p in args.import_) if args.import_ else None
    station = init_station(station_dir(args), args.trust_domain, passphrase(args), ca_import=ca_import,  # type: ignore[arg-type]
                           ledger=args.db, tiers=args.tiers, keys=args.keys)
    issuing = station.ca_chain[0]
    print(f"station initialised in {station.directory} (trust domain {station.settings.trust_domain})")
    if len(station.ca_chain) == 1:
        print(f"CA          {issuing.subject.rfc4514_string()}  ->  {station.path('ca.pem')} "
              "(one tier: it signs devices itself; device chains are 2 long)")
        return 0
    print(f"root        {station.root.subject.rfc4514_string()}  ->  {station.path('ca.pem')}")
    print(f"issuing CA  {issuing.subject.rfc4514_string()}  ->  {station.path('ca-chain.pem')}")
    return 0


def cmd_cloud_c8y_pop(args: argparse.Namespace) -> int:
    from provisioning.station.cloud import c8y_signed_code

    station = open_station(args)
    print(c8y_signed_code(station, args.code))  # stdout carries only the signed code: paste or script it
    print(f"signed with the key of {station.issuer.cert.subject.rfc4514_string()} ({station.path('issuing.pem')}, "
          "the certificate to upload to Cumulocity)", file=sys.stderr)
    return 0


def cmd_cloud_aws(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from provisioning.station.cloud import aws_verification_cert

    station = open_station(args)
    cert = aws_verification_cert(station, args.code)
    write_out(args.out, cert.public_bytes(Encoding.PEM))
    print(f"verification certificate CN={args.code}, issued by {station.issuer.cert.subject.rfc4514_string()}; "
          f"register {station.path('issuing.pem')} with it", file=sys.stderr)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from provisioning.certs import common_name, load_csr, to_pem

    station = open_station(args)
    data = storage.read_bytes(args.csr_file)
    if data is None:
        raise StationError(f"{args.csr_file}: no such CSR file")
    csr = load_csr(data, args.csr_file)
    device_id = common_name(csr.subject) or ""
    try:
        check_device_id(device_id, f"{args.csr_file}: CN", station.settings.reserved)
        station.policy.check_csr(csr, device_id)
    except (PolicyError, ProvisioningError) as exc:
        raise StationError(f"{args.csr_file}: {exc}") from None
    fingerprint = hashlib.sha256(csr.public_bytes(Encoding.DER)).hexdigest()
    with station.open_ledger(args.db) as ledger:
        row, reused = ledger.issue(device_id, fingerprint, unix_now(),
                                   lambda: station.device_cert(csr.public_key(), device_id, days=args.days))
    write_out(args.out, to_pem([row.certificate, *station.ca_chain]))
    print(f"{'already issued' if reused else 'issued'} serial {row.serial} to {device_id}", file=sys.stderr)
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from provisioning.station.export import write_device_bundle

    station = open_station(args)
    if args.service:  # a service identity (e.g. the lab's token service) is exactly a reserved name
        if args.device_id not in station.settings.reserved:
            raise StationError(f"--service {args.device_id!r}: not one of station.toml reserved_ids "
                               f"({station.settings.reserved_ids or 'empty'})")
        device_id = check_device_id(args.device_id, "DEVICE_ID", ())
    else:
        device_id = check_device_id(args.device_id, "DEVICE_ID", station.settings.reserved)
    key = generate("ec-p256")
    with station.open_ledger(args.db) as ledger:
        row, _ = ledger.issue(device_id, "station-generated-key", unix_now(),
                              lambda: station.device_cert(key.public_key(), device_id, days=args.days), reuse=False,
                              kind="service" if args.service else "device")
    files = write_device_bundle(Path(args.out), args.format, key, [row.certificate, *station.ca_chain])
    print(f"issued serial {row.serial} to {device_id}: {', '.join(str(f) for f in files)}")
    return 0


def cmd_server_cert(args: argparse.Namespace) -> int:
    from provisioning.station.ca import default_server_names
    from provisioning.station.export import write_server_bundle

    station = open_station(args)
    dns, ips = (args.dns or [], args.ip or [])
    if not dns and not ips:
        dns, ips = default_server_names()
    cn = args.cn or (dns[0] if dns else ips[0])
    key = generate("ec-p256")
    with station.open_ledger(args.db) as ledger:
        row, _ = ledger.issue(cn, "station-generated-key", unix_now(),
                              lambda: station.server_cert(key.public_key(), cn, dns, ips, args.days),
                              kind="server", reuse=False)
    files = write_server_bundle(Path(args.out), key, row.certificate, station.ca_chain)
    print(f"issued server certificate {row.subject} (serial {row.serial}, SANs {', '.join([*dns, *ips])}): "
          f"{', '.join(str(f) for f in files)}")
    return 0


def cmd_release_keygen(args: argparse.Namespace) -> int:
    from provisioning import release

    station = open_station(args)
    # the chain above the issuing CA goes into release.pem, so a device can reach its trust anchor
    key = None
    if station.settings.keys:  # the release key is made in the token beside the CA keys
        from provisioning.station.ca import RELEASE_LABEL

        try:
            if not station.key_store.exists(RELEASE_LABEL):
                station.key_store.create(RELEASE_LABEL)
            elif not args.force:
                raise StationError(f"keys: the token holds a release key already ({station.settings.keys}); "
                                   "pass --force to certify it again")
        except KeyStoreError as exc:
            raise StationError(f"keys: {exc}") from None
        key = station.release_key()
    signer = release.create_release_signer(station.issuer, station.path("release"), chain=station.ca_chain[1:],
                                           overwrite=args.force, key=key)
    print(signer)
    return 0


def cmd_release_sign(args: argparse.Namespace) -> int:
    from provisioning import release

    station = open_station(args)
    if args.format and station.settings.keys:
        raise StationError("release sign --format: bundles are signed with release/release.key; a station whose "
                           "keys are in a token signs the plain manifest only (leave --format out)")
    if args.format:  # build the framework's bundle (signed with the same key), then sign it as the payload
        manifest = release.sign_bundle(station.path("release"), args.name, args.version, args.format,
                                       Path(args.payload), Path(args.out), min_version=args.min_version)
    else:
        manifest = release.sign_release(station.path("release"), args.name, args.version, Path(args.payload),
                                        Path(args.out), min_version=args.min_version, key=station.release_key())
    print(json.dumps(manifest, indent=1, default=str))
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Handler]:
    """Add these sub-commands' parsers to `sub`; their handlers by command name."""
    p = sub.add_parser("init", parents=[common], help="create the root and issuing CA (or import a CA)")
    p.add_argument("--trust-domain", default="tether.local", help="SPIFFE trust domain of device certificates")
    p.add_argument("--import", dest="import_", nargs=3, metavar=("CERT", "KEY", "CHAIN"),
                   help="bring your own issuing CA: its certificate, key and chain up to the root")
    p.add_argument("--keys", metavar="URI", help="make the CA keys (and later the release key) inside a PKCS#11 "
                   "token: pkcs11:token=LABEL;object=PREFIX?module-path=LIB.so&pin-source=FILE (PIN from that file "
                   "or $TETHER_PKCS11_PIN, never on the command line; docs/station.md 'HSM keys'). Default: files")
    p.add_argument("--tiers", type=int, choices=(1, 2), default=2, help="2: root + issuing CA (default); "
                   "1: one CA signs devices (chain of 2, what Cumulocity's cloud accepts)")
    cloud = sub.add_parser("cloud", help="prove possession of the CA key to a cloud").add_subparsers(
        dest="sub", required=True)
    p = cloud.add_parser("c8y-pop", parents=[common], help="print Cumulocity's signed verification code")
    p.add_argument("--code", required=True, help="the unsigned verification code Cumulocity shows")
    p = cloud.add_parser("aws-verification-cert", parents=[common],
                         help="write AWS IoT's verification certificate (CN = registration code)")
    p.add_argument("--code", required=True, help="the registration code (aws iot get-registration-code)")
    p.add_argument("--out", required=True, help="PEM file to write (- for stdout)")
    p = sub.add_parser("sign", parents=[common], help="sign a device CSR offline (chain PEM out)")
    p.add_argument("csr_file", metavar="CSR_FILE")
    p.add_argument("--out", help="chain file (default: stdout)")
    p.add_argument("--days", type=int)
    p = sub.add_parser("issue", parents=[common], help="make key + certificate for a board that cannot")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--service", action="store_true", help="a client certificate for a service identity named "
                   "in station.toml reserved_ids (never re-enrolls; not exported as a device)")
    p.add_argument("--format", choices=("pem", "der"), default="pem")
    p.add_argument("--out", required=True, help="directory for the files")
    p.add_argument("--days", type=int)
    p = sub.add_parser("server-cert", parents=[common], help="certificate for a broker or core")
    p.add_argument("--dns", action="append", help="DNS SAN (repeat)")
    p.add_argument("--ip", action="append", help="IP SAN (repeat)")
    p.add_argument("--cn", help="common name (default: first SAN)")
    p.add_argument("--out", required=True, help="directory: server.pem, server.key, ca.pem")
    p.add_argument("--days", type=int)
    rel = sub.add_parser("release", help="OTA release signing").add_subparsers(dest="sub", required=True)
    p = rel.add_parser("keygen", parents=[common], help="create the release signing key in DIR/release")
    p.add_argument("--force", action="store_true", help="replace an existing release key")
    p = rel.add_parser("sign", parents=[common], help="sign a release payload into a release directory")
    p.add_argument("--name", required=True, help="release name (what the device installs)")
    p.add_argument("--version", required=True, help="dotted version; devices refuse lower ones")
    p.add_argument("--out", required=True, help="release directory: manifest.json, manifest.sig, signer.pem, "
                   "payload")
    p.add_argument("--min-version", help="lowest installed version this release may update")
    p.add_argument("--format", choices=("swu", "raucb", "tar"), help="build this bundle from the PAYLOAD "
                   "directory first (swu: sw-description + images; raucb: manifest.raucm + images; tar); "
                   "without it PAYLOAD is a file signed as it is")
    p.add_argument("payload")
    return {
        "init": cmd_init,
        "cloud c8y-pop": cmd_cloud_c8y_pop,
        "cloud aws-verification-cert": cmd_cloud_aws,
        "sign": cmd_sign,
        "issue": cmd_issue,
        "server-cert": cmd_server_cert,
        "release keygen": cmd_release_keygen,
        "release sign": cmd_release_sign,
    }
