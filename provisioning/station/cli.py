"""`tether-station`: the factory station's command line. Thin: parse, call the module that owns it, print.

Every command takes `--dir DIR` (default $TETHER_STATION_DIR) and, when the CA keys are encrypted,
`--passphrase-file F` (default $TETHER_STATION_PASSPHRASE_FILE). Exit status: 0 success, 1 a
Tether error (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hal import storage
from hal.about import VersionAction
from hal.errors import KeyStoreError, TetherError
from hal.keys.file import generate
from provisioning.errors import PolicyError, ProvisioningError
from provisioning.identity import check_device_id
from provisioning.station import extras, service
from provisioning.station.backup import backup, restore
from provisioning.station.errors import StationError
from provisioning.station.ledger import KINDS, REASONS
from provisioning.station.otp import new_otp, otp_hash

log = logging.getLogger("tether.station")
Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn
    return register


def _passphrase(args: argparse.Namespace) -> bytes | None:
    path = args.passphrase_file or os.environ.get("TETHER_STATION_PASSPHRASE_FILE")
    if not path:
        return None
    data = storage.read_bytes(path)
    if data is None or not data.strip():
        raise StationError(f"{path}: passphrase file missing or empty")
    return data.splitlines()[0].strip()


def _dir(args: argparse.Namespace) -> Path:
    directory = args.dir or os.environ.get("TETHER_STATION_DIR")
    if not directory:
        raise StationError("no station directory: pass --dir DIR or set TETHER_STATION_DIR")
    return Path(directory)


def _station(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from provisioning.station.ca import Station

    return Station(_dir(args), _passphrase(args))


def _now() -> int:
    return int(time.time())


def _iso(ts: int | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _out(path: str | None, data: bytes, mode: int = storage.PUBLIC_MODE) -> None:
    if path and path != "-":
        storage.atomic_write(path, data, mode)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


# -- CA -------------------------------------------------------------------------------------------------
@command("init")
def cmd_init(args: argparse.Namespace) -> int:
    from provisioning.station.ca import init_station

    ca_import = tuple(Path(p) for p in args.import_) if args.import_ else None
    station = init_station(_dir(args), args.trust_domain, _passphrase(args), ca_import=ca_import,  # type: ignore[arg-type]
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


# -- cloud registration ---------------------------------------------------------------------------------
@command("cloud c8y-pop")
def cmd_cloud_c8y_pop(args: argparse.Namespace) -> int:
    from provisioning.station.cloud import c8y_signed_code

    station = _station(args)
    print(c8y_signed_code(station, args.code))  # stdout carries only the signed code: paste or script it
    print(f"signed with the key of {station.issuer.cert.subject.rfc4514_string()} ({station.path('issuing.pem')}, "
          "the certificate to upload to Cumulocity)", file=sys.stderr)
    return 0


@command("cloud aws-verification-cert")
def cmd_cloud_aws(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from provisioning.station.cloud import aws_verification_cert

    station = _station(args)
    cert = aws_verification_cert(station, args.code)
    _out(args.out, cert.public_bytes(Encoding.PEM))
    print(f"verification certificate CN={args.code}, issued by {station.issuer.cert.subject.rfc4514_string()}; "
          f"register {station.path('issuing.pem')} with it", file=sys.stderr)
    return 0


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from provisioning.station.server import Limits, serve

    settings = service.resolve(vars(args), args.config)
    args = argparse.Namespace(**{**vars(args), **dataclasses.asdict(settings), "workers": settings.worker_count})
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise StationError(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8443")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)

    for option, least in (("request_timeout", 0.001), ("idle_timeout", 0.001), ("max_per_client", 0),
                          ("max_connections", 0), ("handshake_cpu", 0), ("console_max_connections", 0)):
        if getattr(args, option) < least:
            raise StationError(f"--{option.replace('_', '-')} {getattr(args, option)}: must be "
                               f"{'positive' if least else 'zero (no cap) or more'}")
    limits = Limits(request_timeout=args.request_timeout, idle_timeout=args.idle_timeout,
                    max_per_client=args.max_per_client, max_connections=args.max_connections,
                    handshake_cpu=args.handshake_cpu)
    station = _station(args)
    console = None
    if args.console and (absent := extras.missing(extras.CONSOLE)):
        log.warning(extras.off_because(f"--console {args.console}", absent))
    elif args.console:
        from provisioning.station.console.server import ConsoleService, parse_address

        console = ConsoleService(station, *parse_address(args.console, args.console_remote), ledger=args.db,
                                 handshake_cpu=args.handshake_cpu, max_connections=args.console_max_connections)
        print(f"tether-station: console on {console.url} (operator certificates: tether-station operator add)",
              flush=True)
    metrics, recorder, metrics_dir = _metrics(args, station)

    def ready(bound: int) -> None:
        print(f"tether-station: EST listening on https://{args.listen.rpartition(':')[0]}:{bound}"
              f"/.well-known/est/ ({args.workers} worker(s))", flush=True)
        if args.port_file:  # for scripts and tests that listen on port 0: every socket listens by now
            storage.write_json(args.port_file, {"est": bound, **({"console": console.port} if console else {}),
                                                **({"metrics": metrics.port} if metrics else {})})

    try:
        return serve(station, host, int(port), workers=args.workers, threads=args.threads, ledger=args.db,
                     limits=limits, ready=ready, console=console, metrics=metrics, recorder=recorder)
    finally:
        if metrics_dir is not None:
            from provisioning.station.metrics import stop_multiprocess

            stop_multiprocess(metrics_dir)


def _metrics(args: argparse.Namespace, station: object):  # type: ignore[no-untyped-def]
    """(MetricsService, recorder, value directory) for --metrics, or (None, None, None) when off."""
    if not args.metrics:
        return None, None, None
    from provisioning.station.metrics_server import MetricsService, parse_metrics_address

    host, port = parse_metrics_address(args.metrics)  # a bad address is an error even without the extra
    if args.metrics_expiring_days < 1:
        raise StationError(f"--metrics-expiring-days {args.metrics_expiring_days}: must be 1 or more days")
    if absent := extras.missing(extras.METRICS):
        log.warning(extras.off_because(f"--metrics {args.metrics}", absent))
        return None, None, None
    from provisioning.station.metrics import start_multiprocess, stop_multiprocess

    counting, directory = start_multiprocess(os.environ.get("RUNTIME_DIRECTORY"))
    try:
        service = MetricsService(station, host, port, counting, directory, ledger=args.db,  # type: ignore[arg-type]
                                 expiring_days=args.metrics_expiring_days)
    except BaseException:
        stop_multiprocess(directory)
        raise
    print(f"tether-station: metrics on {service.url} (loopback only)", flush=True)
    return service, counting, directory


@command("otp")
def cmd_otp(args: argparse.Namespace) -> int:
    station = _station(args)
    device_id = check_device_id(args.device_id, "DEVICE_ID", station.settings.reserved)
    ttl = args.ttl if args.ttl is not None else station.settings.otp_ttl
    if ttl <= 0:
        raise StationError(f"--ttl {ttl}: must be a positive number of seconds")
    otp = new_otp()
    ledger = station.open_ledger(args.db)
    try:
        now = _now()
        ledger.add_otp(device_id, otp_hash(device_id, otp), now, now + ttl)
    finally:
        ledger.close()
    print(otp)  # stdout carries only the password: factory scripts capture it
    print(f"one-time password for {device_id}, valid until {_iso(now + ttl)} (it admits the device again after "
          "a revocation; passwords issued before a revocation stay void)", file=sys.stderr)
    return 0


# -- ledger ---------------------------------------------------------------------------------------------
@command("ledger list")
def cmd_ledger_list(args: argparse.Namespace) -> int:
    station = _station(args)
    ledger = station.open_ledger(args.db)
    try:
        rows = ledger.rows(args.kind)
    finally:
        ledger.close()
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=1))
        return 0
    print(f"{'serial':<42} {'device':<24} {'kind':<6} {'not after':<20} {'issued at':<20} revoked at")
    for r in rows:
        print(f"{r.serial:<42} {r.device_id:<24} {r.kind:<6} {_iso(r.not_after):<20} {_iso(r.issued_at):<20} "
              f"{_iso(r.revoked_at)}")
    return 0


@command("revoke")
def cmd_revoke(args: argparse.Namespace) -> int:
    if (args.serial is None) == (args.device is None):
        raise StationError("revoke: give either a SERIAL or --device ID (not both)")
    station = _station(args)
    ledger = station.open_ledger(args.db)
    try:
        if args.device is not None:
            rows = ledger.revoke_device(args.device, _now(), args.reason)
        else:
            rows = ledger.revoke(args.serial, _now(), args.reason)
    finally:
        ledger.close()
    for row in rows:
        inherited = f", issued from {row.predecessor}" if row.predecessor else ""
        print(f"revoked serial {row.serial} ({row.subject}{inherited}): {row.revoke_reason}")
    print(f"{len(rows)} certificate(s) revoked; publish a new CRL: tether-station crl --out FILE", file=sys.stderr)
    for device_id in sorted({r.device_id for r in rows if r.kind == "device"}):
        print(f"device {device_id} is barred: neither its bootstrap certificate nor a one-time password issued "
              f"before now enrolls it; admit it again with `tether-station otp {device_id}` (a new password) or "
              f"`tether-station readmit {device_id}` (its bootstrap certificate)", file=sys.stderr)
    return 0


@command("readmit")
def cmd_readmit(args: argparse.Namespace) -> int:
    station = _station(args)
    ledger = station.open_ledger(args.db)
    try:
        bar = ledger.readmit(args.device_id)
    finally:
        ledger.close()
    print(f"device {bar.device_id} readmitted: its bootstrap certificate enrolls it again (barred since "
          f"{_iso(bar.barred_at)}, {bar.reason}); passwords issued before the revocation stay void")
    return 0


@command("ledger barred")
def cmd_ledger_barred(args: argparse.Namespace) -> int:
    station = _station(args)
    ledger = station.open_ledger(args.db)
    try:
        bars = ledger.bars()
    finally:
        ledger.close()
    if args.json:
        print(json.dumps([{"device_id": b.device_id, "barred_at": b.barred_at, "reason": b.reason} for b in bars],
                         indent=1))
        return 0
    print(f"{'device':<24} {'barred at':<20} reason")
    for b in bars:
        print(f"{b.device_id:<24} {_iso(b.barred_at):<20} {b.reason}")
    return 0


# -- attested enrollment: the EK allow-list ----------------------------------------------------------------
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


def _attest_store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from provisioning.station.attest_store import AttestStore

    return AttestStore(_station(args).open_ledger(args.db))


@command("attest allow")
def cmd_attest_allow(args: argparse.Namespace) -> int:
    digests = _ek_digests(args)
    if args.device and len(digests) != 1:
        raise StationError(f"--device binds one EK to one device id; {len(digests)} EKs given")
    store = _attest_store(args)
    try:
        store.allow([(d, args.device) for d in digests], args.batch, _now())
    finally:
        store.ledger.close()
    for digest in digests:
        print(f"allowed {digest} (batch {args.batch}{', device ' + args.device if args.device else ''})")
    return 0


@command("attest list")
def cmd_attest_list(args: argparse.Namespace) -> int:
    store = _attest_store(args)
    try:
        rows = store.allow_list(args.batch)
    finally:
        store.ledger.close()
    for row in rows:
        print(f"{row.ek_digest}  {row.batch}  {row.device_id or '-'}  {_iso(row.added_at)}")
    return 0


@command("attest remove")
def cmd_attest_remove(args: argparse.Namespace) -> int:
    if bool(args.digest) == bool(args.batch):
        raise StationError("name one EK digest or --batch NAME")
    store = _attest_store(args)
    try:
        digest = _ek_digests(argparse.Namespace(digest=[args.digest], ek_cert=None))[0] if args.digest else None
        n = store.disallow(digest, args.batch)
    finally:
        store.ledger.close()
    if n == 0:
        raise StationError(f"nothing to remove: {args.digest or 'batch ' + args.batch} is not on the EK allow-list")
    print(f"removed {n} EK(s) from the allow-list")
    return 0


@command("crl")
def cmd_crl(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    station = _station(args)
    ledger = station.open_ledger(args.db)
    try:
        crl = station.ledger_crl(ledger, _now(), args.days)  # the console's export calls the same
    finally:
        ledger.close()
    _out(args.out, crl.public_bytes(Encoding.DER if args.format == "der" else Encoding.PEM))
    print(f"CRL with {len(crl)} revoked certificate(s), next update {crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}",
          file=sys.stderr)
    return 0


@command("export c8y-bulk")
def cmd_export_c8y(args: argparse.Namespace) -> int:
    from provisioning.station.export import c8y_bulk_csv

    station = _station(args)
    ledger = station.open_ledger(args.db)
    try:
        text = c8y_bulk_csv(ledger.rows("device"), args.type, args.id_type)
    finally:
        ledger.close()
    _out(args.out, text.encode())
    return 0


# -- backup ---------------------------------------------------------------------------------------------
@command("backup")
def cmd_backup(args: argparse.Namespace) -> int:
    station = _station(args)
    result = backup(station.directory, args.db or station.settings.ledger, Path(args.out))
    ledger = "and a copy of the SQLite ledger" if result.ledger == "sqlite" else "(not the ledger)"
    print(f"backed up {result.files} file(s) of {station.directory} {ledger} to {result.archive} (mode 0600: "
          "it holds the CA keys)")
    if result.postgres_hint:
        print(f"tether-station: {result.postgres_hint}", file=sys.stderr)
    return 0


@command("restore")
def cmd_restore(args: argparse.Namespace) -> int:
    written, aside = restore(Path(args.archive), _dir(args), force=args.force)
    print(f"restored {written} file(s) into {_dir(args)}")
    if aside is not None:
        print(f"the directory that was there is kept as {aside}", file=sys.stderr)
    return 0


# -- console operators (provisioning.station.console) ---------------------------------------------------
@command("operator add")
def cmd_operator_add(args: argparse.Namespace) -> int:
    from provisioning.station.console.operators import add_operator
    from provisioning.station.console.store import ADMIN, ConsoleStore

    station = _station(args)
    password = None
    if args.p12_passphrase_file:
        data = storage.read_bytes(args.p12_passphrase_file)
        if data is None or not data.strip():
            raise StationError(f"--p12-passphrase-file {args.p12_passphrase_file}: missing or empty")
        password = data.decode().splitlines()[0].strip()
    ledger = station.open_ledger(args.db)
    try:
        store = ConsoleStore(ledger)
        issued = add_operator(station, store, args.name, args.role, Path(args.out), _now(), password)
        store.audit(_cli_who(), "operator add", f"{issued.name} ({issued.role}), serial {issued.serial}", "cli",
                    ADMIN)
    finally:
        ledger.close()
    print(f"operator {issued.name} ({issued.role}), serial {issued.serial}: "
          f"{', '.join(str(f) for f in issued.files)}", file=sys.stderr)
    if not password:
        print(f"PKCS#12 password (shown once): {issued.p12_password}")
    return 0


@command("operator revoke")
def cmd_operator_revoke(args: argparse.Namespace) -> int:
    from provisioning.station.console.store import ADMIN, ConsoleStore

    station = _station(args)
    ledger = station.open_ledger(args.db)
    try:
        store = ConsoleStore(ledger)
        revoked = store.revoke_operator(args.name, _now())
        store.audit(_cli_who(), "operator revoke", f"{args.name}: serial(s) {', '.join(o.serial for o in revoked)}",
                    "cli", ADMIN)
    finally:
        ledger.close()
    print(f"revoked {len(revoked)} console certificate(s) of operator {args.name}")
    return 0


@command("operator list")
def cmd_operator_list(args: argparse.Namespace) -> int:
    from provisioning.station.console.store import ConsoleStore

    station = _station(args)
    ledger = station.open_ledger(args.db)
    try:
        operators = ConsoleStore(ledger).operators()
    finally:
        ledger.close()
    print(f"{'name':<20} {'role':<9} {'serial':<42} {'not after':<20} revoked at")
    for o in operators:
        print(f"{o.name:<20} {o.role:<9} {o.serial:<42} {_iso(o.not_after):<20} {_iso(o.revoked_at)}")
    return 0


def _cli_who() -> str:
    import getpass
    import socket

    return f"cli {getpass.getuser()}@{socket.gethostname()}"


# -- offline issuing -------------------------------------------------------------------------------------
@command("sign")
def cmd_sign(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from provisioning.certs import common_name, load_csr, to_pem

    station = _station(args)
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
    ledger = station.open_ledger(args.db)
    try:
        row, reused = ledger.issue(device_id, fingerprint, _now(),
                                   lambda: station.device_cert(csr.public_key(), device_id, days=args.days))
    finally:
        ledger.close()
    _out(args.out, to_pem([row.certificate, *station.ca_chain]))
    print(f"{'already issued' if reused else 'issued'} serial {row.serial} to {device_id}", file=sys.stderr)
    return 0


@command("issue")
def cmd_issue(args: argparse.Namespace) -> int:
    from provisioning.station.export import write_device_bundle

    station = _station(args)
    if args.service:  # a service identity (e.g. the lab's token service) is exactly a reserved name
        if args.device_id not in station.settings.reserved:
            raise StationError(f"--service {args.device_id!r}: not one of station.toml reserved_ids "
                               f"({station.settings.reserved_ids or 'empty'})")
        device_id = check_device_id(args.device_id, "DEVICE_ID", ())
    else:
        device_id = check_device_id(args.device_id, "DEVICE_ID", station.settings.reserved)
    key = generate("ec-p256")
    ledger = station.open_ledger(args.db)
    try:
        row, _ = ledger.issue(device_id, "station-generated-key", _now(),
                              lambda: station.device_cert(key.public_key(), device_id, days=args.days), reuse=False,
                              kind="service" if args.service else "device")
    finally:
        ledger.close()
    files = write_device_bundle(Path(args.out), args.format, key, [row.certificate, *station.ca_chain])
    print(f"issued serial {row.serial} to {device_id}: {', '.join(str(f) for f in files)}")
    return 0


@command("server-cert")
def cmd_server_cert(args: argparse.Namespace) -> int:
    from provisioning.station.ca import default_server_names
    from provisioning.station.export import write_server_bundle

    station = _station(args)
    dns, ips = (args.dns or [], args.ip or [])
    if not dns and not ips:
        dns, ips = default_server_names()
    cn = args.cn or (dns[0] if dns else ips[0])
    key = generate("ec-p256")
    ledger = station.open_ledger(args.db)
    try:
        row, _ = ledger.issue(cn, "station-generated-key", _now(),
                              lambda: station.server_cert(key.public_key(), cn, dns, ips, args.days),
                              kind="server", reuse=False)
    finally:
        ledger.close()
    files = write_server_bundle(Path(args.out), key, row.certificate, station.ca_chain)
    print(f"issued server certificate {row.subject} (serial {row.serial}, SANs {', '.join([*dns, *ips])}): "
          f"{', '.join(str(f) for f in files)}")
    return 0


# -- OTA release signing (provisioning.release) --------------------------------------------------------
@command("release keygen")
def cmd_release_keygen(args: argparse.Namespace) -> int:
    from provisioning import release

    station = _station(args)
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


@command("release sign")
def cmd_release_sign(args: argparse.Namespace) -> int:
    from provisioning import release

    station = _station(args)
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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", help="station directory (default: $TETHER_STATION_DIR)")
    common.add_argument("--passphrase-file", help="file whose first line decrypts (or, at init, encrypts) "
                        "the CA keys (default: $TETHER_STATION_PASSPHRASE_FILE)")
    common.add_argument("--db", help="ledger: postgresql://... URL or SQLite path (default: station.toml)")
    parser = argparse.ArgumentParser(prog="tether-station", description="Tether factory provisioning station: "
                                     "CA, EST enrollment server, issuance ledger, one-time passwords.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    p = sub.add_parser("serve", parents=[common], help="EST enrollment server over HTTPS")
    # defaults live in provisioning.station.service.DEFAULTS: an option given here beats --config's file
    p.add_argument("--config", metavar="FILE", help="read these options from FILE's [serve] table first "
                   "(the service's /etc/tether/station.toml); options given here win")
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8443)")
    p.add_argument("--workers", type=int, help="processes (default: CPU count)")
    p.add_argument("--threads", type=int, help="requests each worker computes at once (default 8; "
                   "idle and slow connections do not hold one)")
    p.add_argument("--request-timeout", type=float, help="seconds for the TLS handshake and one "
                   "whole request, however slowly it arrives (default 10; then 408)")
    p.add_argument("--idle-timeout", type=float, help="seconds a kept-alive connection may wait "
                   "for its next request (default 5)")
    p.add_argument("--max-per-client", type=int, help="connections one client address may hold "
                   "per worker process; more are closed at accept (default 64, 0 = no cap)")
    p.add_argument("--max-connections", type=int, help="connections one worker process holds "
                   "(about 31 KB each); past that the oldest one still shaking hands or reading a request is "
                   "closed to make room (default 2048, 0 = no cap)")
    p.add_argument("--handshake-cpu", type=float, help="CPU seconds per second one client (IPv4 "
                   "address or IPv6 /64) may make a worker spend on TLS handshakes, 30 s of it at once; past "
                   "that its new connections are closed at accept (default 0.1, 0 = no budget)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    p.add_argument("--console", metavar="HOST:PORT", help="also serve the operators' web console there "
                   "(HTTPS, operator client certificates; off unless given; e.g. 127.0.0.1:8444)")
    p.add_argument("--console-remote", action="store_true", default=None,
                   help="allow --console on a non-loopback address")
    p.add_argument("--console-max-connections", type=int, help="connections the console holds "
                   "(a thread each); past that the oldest one still shaking hands or waiting for a request is "
                   "closed to make room (default 128, 0 = no cap); --handshake-cpu applies to the console too")
    p.add_argument("--metrics", metavar="HOST:PORT", help="also serve Prometheus metrics at "
                   "http://HOST:PORT/metrics (loopback only, plain HTTP; off unless given; e.g. 127.0.0.1:9464)")
    p.add_argument("--metrics-expiring-days", type=int, metavar="N", help="certificates expiring "
                   "within N days are counted as expiring (default 30)")
    p.add_argument("--port-file", metavar="FILE", help="once listening, write the bound ports there as JSON, "
                   '{"est": PORT, "console": PORT, "metrics": PORT} (for HOST:0: the kernel picks the port)')
    p = sub.add_parser("backup", parents=[common], help="archive the station directory and its SQLite ledger "
                       "(online; for PostgreSQL it prints the pg_dump to run)")
    p.add_argument("--out", required=True, help="archive to write (.tar.gz, mode 0600)")
    p = sub.add_parser("restore", parents=[common], help="restore a backup archive into --dir (empty or new)")
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("--force", action="store_true", help="restore over a non-empty --dir, which is set aside as "
                   "DIR.before-restore-TIME (never deleted)")
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
    p = sub.add_parser("crl", parents=[common], help="write a CRL signed by the issuing CA")
    p.add_argument("--out", help="file (default: stdout)")
    p.add_argument("--format", choices=("pem", "der"), default="pem")
    p.add_argument("--days", type=int, help="validity (default: station.toml crl_days)")
    export = sub.add_parser("export", help="exports").add_subparsers(dest="sub", required=True)
    p = export.add_parser("c8y-bulk", parents=[common], help="Cumulocity bulk registration CSV (certificates)")
    p.add_argument("--out", help="file (default: stdout)")
    p.add_argument("--type", default="c8y_Device", help="TYPE column")
    p.add_argument("--id-type", default="c8y_Serial", help="IDTYPE column")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command + (f" {args.sub}" if getattr(args, "sub", None) else "")
    try:
        return COMMANDS[name](args)
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
