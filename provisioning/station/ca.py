"""The station directory: its CA (made at init or imported), its settings and its own TLS certificate.

Layout of DIR (every key file 0600, written atomically):
  station.toml    settings: trust domain, ledger location, lifetimes, bootstrap CA
  ca.pem          the root certificate: the trust anchor devices and EST clients are given
  root.key        the root's key (absent when the CA was imported without it)
  issuing.pem     the issuing CA that signs device and server certificates
  issuing.key     its key (passphrase-encrypted when init was given one)
                  (`init --keys pkcs11:...`: root.key, issuing.key and release/release.key are not files
                  but keys in the token station.toml's `keys` names, labelled <object>-root, -issuing, -release)
  ca-chain.pem    issuing CA .. root: what follows a leaf in every chain the station hands out
                  (`init --tiers 1`: one CA is root and issuer, so ca.pem = issuing.pem = ca-chain.pem
                  and there is no root.key)
  server.pem      the EST server's certificate + issuing CA, server.key its key
  ledger.sqlite   the issuance ledger (unless station.toml names a PostgreSQL URL)
  release/        OTA release signing material
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import itertools
import socket
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography import x509

from hal import KeyStoreError, storage
from hal.keys import open_key_uri, parse_key_uri
from hal.keys.file import generate, load_pem, to_pem
from provisioning import PemError, ProvisioningError, authority
from provisioning.attest.verify import EkTrust
from provisioning.authority import DeviceTemplate, Issued, Issuer
from provisioning.certs import issued_by, load_certificates, same_public_key, serial_of, subject_of
from provisioning.certs import to_pem as certs_pem
from provisioning.identity import RESERVED_IDS, check_trust_domain
from provisioning.policy import ChainPolicy
from provisioning.station.errors import Refusal, StationError
from provisioning.station.ledger import DEFAULT_MAX_VALID, DEFAULT_SUPERSEDE_GRACE, Ledger, Row
from provisioning.tomlfmt import render_pairs

SETTINGS, ROOT, ROOT_KEY, ISSUING, ISSUING_KEY, CHAIN = (
    "station.toml", "ca.pem", "root.key", "issuing.pem", "issuing.key", "ca-chain.pem")
SERVER, SERVER_KEY, LEDGER, RELEASE = "server.pem", "server.key", "ledger.sqlite", "release"


# settings older stations wrote that no longer do anything: otp_max_failures locked a device's password
# after that many wrong guesses from anyone (issue 22 item 5)
_RETIRED = frozenset({"otp_max_failures"})


@dataclass(frozen=True)
class Settings:
    """station.toml. `ledger` is a path relative to DIR or a postgresql:// URL."""

    trust_domain: str = "tether.local"
    ledger: str = LEDGER
    ledger_sync: str = "full"     # SQLite: "full" (fsync per issuance) or "normal" (see ledger.py)
    device_days: int = 365
    server_days: int = 825
    otp_ttl: int = 24 * 3600
    crl_days: int = 7
    max_valid_certs: int = DEFAULT_MAX_VALID        # valid certificates one device may hold at once
    supersede_grace: int = DEFAULT_SUPERSEDE_GRACE  # s a re-enrolled certificate lives if its successor is unused
    otp_failure_burst: int = 5      # wrong guesses from one client address before 429 ...
    otp_failure_window: int = 60    # ... within this many seconds (the 429 ends when it has passed)
    events_per_address: int = 10    # refused requests from one address recorded one by one per ...
    events_window: int = 60         # ... this many seconds; the rest become one summary row
    events_max_age: int = 30 * 24 * 3600  # refusal records older than this many seconds are deleted
    events_max_rows: int = 100_000  # and only the newest this many are kept
    reserved_ids: str = ",".join(RESERVED_IDS)  # comma-separated ids never issued to devices
    bootstrap_ca: str = ""        # PEM file of CAs whose client certificates may enroll (factory bootstrap)
    reenroll_password_file: str = ""  # file (0600) of a password re-enrollment asks too, besides mTLS
    ek_roots: str = ""            # PEM file of TPM makers' EK root and intermediate CAs (attested enrollment)
    ek_allowlist: bool = False    # attested enrollment only for EKs registered with `attest allow`
    attest_ttl: int = 300         # seconds a TPM credential challenge stays open
    encrypted_keys: bool = False
    keys: str = ""                # key URI of the CA and release keys ("" = the files above; pkcs11:... = a token)
    imported: bool = False

    def render(self) -> bytes:
        """station.toml's text (the one TOML writer escapes every string, so any value reads back)."""
        return ("# tether-station settings; edit with care, restart `serve` to apply\n"
                + render_pairs(dataclasses.asdict(self))).encode()

    @classmethod
    def read(cls, path: Path) -> Settings:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise StationError(f"{path.parent}: not a station directory (no {SETTINGS}); run "
                               "`tether-station init --dir DIR` first or set TETHER_STATION_DIR") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StationError(f"{path}: cannot read the station settings: {exc}") from None
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        for key in _RETIRED.intersection(data):
            del data[key]  # written by an older station: accepted, without effect
        for key, value in data.items():
            if key not in known:
                raise StationError(f"{path}: unknown setting {key!r}; known: {', '.join(known)}")
            expected = {"str": str, "int": int, "bool": bool}[str(known[key])]
            if type(value) is not expected:
                raise StationError(f"{path}: {key} must be a {expected.__name__}, got {value!r}")
        settings = cls(**data)
        try:
            check_trust_domain(settings.trust_domain, f"{path}: trust_domain")
        except ProvisioningError as exc:
            raise StationError(str(exc)) from None
        for key in ("max_valid_certs", "otp_failure_burst", "otp_failure_window", "events_per_address",
                    "events_window", "events_max_age", "events_max_rows", "attest_ttl"):
            if getattr(settings, key) < 1:
                raise StationError(f"{path}: {key} must be at least 1, got {getattr(settings, key)}")
        if settings.supersede_grace < 0:
            raise StationError(f"{path}: supersede_grace must be 0 or more seconds, got {settings.supersede_grace}")
        return settings

    @property
    def reserved(self) -> frozenset[str]:
        """Device ids the station never issues (the lab's and the platform's service identities)."""
        return frozenset(n.strip() for n in self.reserved_ids.split(",") if n.strip())


def _read(path: Path, what: str) -> bytes:
    data = storage.read_bytes(path)
    if data is None:
        raise StationError(f"{path}: missing {what}; the station directory is incomplete")
    return data


def _load_key(path: Path, passphrase: bytes | None, encrypted: bool) -> Any:
    if encrypted and not passphrase:
        raise StationError(f"{path} is passphrase-encrypted: pass --passphrase-file "
                           "(or set TETHER_STATION_PASSPHRASE_FILE)")
    try:
        return load_pem(_read(path, "CA key"), passphrase if encrypted else None, str(path))
    except KeyStoreError as exc:
        raise StationError(str(exc)) from None


# token key labels (the URI's object= is their prefix)
ROOT_LABEL, ISSUING_LABEL, RELEASE_LABEL = "root", "issuing", "release"
TOKEN_RETRY_AFTER = 5  # s a client waits when the token does not answer (503)


def open_token(uri: str, directory: Path, where: str) -> Any:
    """The PKCS#11 token `uri` (station.toml's `keys`, or init's --keys) names; StationError starting
    with `where` when it is no pkcs11: URI or cannot be opened."""
    try:
        parsed = parse_key_uri(uri)
        if parsed.scheme != "pkcs11":
            raise KeyStoreError(f"{uri!r}: the station keeps CA keys in files (the default) or in a PKCS#11 token "
                                "(pkcs11:token=...); other key stores are for devices")
        return open_key_uri(parsed, directory)
    except KeyStoreError as exc:
        raise StationError(f"{where}: {exc}") from None


@contextmanager
def token_signing() -> Iterator[None]:
    """Around a signature: a token that does not answer becomes 503 with Retry-After (RFC 9110 15.6.4),
    raised inside the ledger's transaction, so nothing of the request is written."""
    try:
        yield
    except KeyStoreError as exc:
        if not exc.retryable:
            raise
        raise Refusal(503, f"the CA key's token does not answer ({exc}); try again later",
                      retry_after=TOKEN_RETRY_AFTER) from None


class Station:
    """A station directory opened for use. CA keys load once, on first use."""

    def __init__(self, directory: str | Path, passphrase: bytes | None = None) -> None:
        self.directory = Path(directory)
        self.passphrase = passphrase
        self.settings = Settings.read(self.directory / SETTINGS)

    def path(self, name: str) -> Path:
        return self.directory / name

    @cached_property
    def root(self) -> x509.Certificate:
        return load_certificates(_read(self.path(ROOT), "root certificate"), str(self.path(ROOT)))[0]

    @cached_property
    def ca_chain(self) -> list[x509.Certificate]:
        """Issuing CA .. root, the certificates that follow a leaf."""
        return load_certificates(_read(self.path(CHAIN), "CA chain"), str(self.path(CHAIN)))

    @cached_property
    def key_store(self) -> Any:
        """The token of `settings.keys` (only for a station whose keys are not files)."""
        return open_token(self.settings.keys, self.directory, f"{self.path(SETTINGS)}: keys")

    def token_key(self, label: str) -> Any:
        """The handle of the token key `label`; StationError (one line) for a wrong PIN or a missing key."""
        try:
            return self.key_store.key(label)
        except KeyStoreError as exc:
            raise StationError(f"keys: {exc}") from None

    def release_key(self) -> Any:
        """The release-signing key's handle when it is in the token; None when it is release/release.key."""
        return self.token_key(RELEASE_LABEL) if self.settings.keys else None

    @cached_property
    def issuer(self) -> Issuer:
        cert = self.ca_chain[0]
        if self.settings.keys:
            key = self.token_key(ISSUING_LABEL)
        else:
            key = _load_key(self.path(ISSUING_KEY), self.passphrase, self.settings.encrypted_keys)
        if not same_public_key(cert.public_key(), key.public_key()):
            raise StationError(f"{self.path(ISSUING_KEY)} is not the key of {subject_of(cert)} "
                               f"(serial {serial_of(cert)}) in {self.path(CHAIN)}")
        return Issuer(cert, key)

    @cached_property
    def device_template(self) -> DeviceTemplate | None:
        """The issuer's device certificate, encoded once (None for an issuer key a template does not
        sign for: then every certificate goes through `CertificateBuilder`)."""
        try:
            return DeviceTemplate.for_issuer(self.issuer, self.settings.trust_domain,
                                             dt.timedelta(days=self.settings.device_days))
        except ValueError as exc:
            raise StationError(f"{self.path(ISSUING)}: {exc}") from None
        except KeyStoreError as exc:  # the template's self-check signs once, with the token's key
            raise StationError(f"{self.path(ISSUING)}: checking the device certificate template: {exc}") from None

    @cached_property
    def policy(self) -> ChainPolicy:
        return ChainPolicy(trust_domain=self.settings.trust_domain, anchors=(self.root,))

    @cached_property
    def bootstrap_cas(self) -> list[x509.Certificate]:
        if not self.settings.bootstrap_ca:
            return []
        path = self.directory / self.settings.bootstrap_ca
        return load_certificates(_read(path, "bootstrap CA file"), str(path))

    @cached_property
    def reenroll_password(self) -> str | None:
        """The password `simplereenroll` demands in HTTP Basic besides the client certificate (RFC 7030
        3.2.3, as libest's estserver does), or None. The file must be private (0600): it is a secret."""
        if not self.settings.reenroll_password_file:
            return None
        path = self.directory / self.settings.reenroll_password_file
        try:
            st = path.stat()
        except OSError as exc:
            raise StationError(f"{SETTINGS} reenroll_password_file: cannot read {path}: {exc.strerror}") from None
        if st.st_mode & 0o077:
            raise StationError(f"{SETTINGS} reenroll_password_file: {path} is readable by others (mode "
                               f"{st.st_mode & 0o777:04o}); chmod 600 {path}")
        lines = _read(path, "re-enrollment password").decode("utf-8", "replace").splitlines()
        if not lines or not lines[0].strip():
            raise StationError(f"{SETTINGS} reenroll_password_file: {path} is empty")
        return lines[0].strip()

    @cached_property
    def ek_trust(self) -> EkTrust:
        """The TPM makers this station trusts for attested enrollment (empty when ek_roots is unset)."""
        if not self.settings.ek_roots:
            return EkTrust(())
        path = self.directory / self.settings.ek_roots
        return EkTrust.of(load_certificates(_read(path, "EK root certificates file (ek_roots)"), str(path)))

    def open_ledger(self, location: str | None = None) -> Ledger:
        """The ledger named by `location` (a --db option) or by the settings."""
        where = location or self.settings.ledger
        if "://" not in where:
            where = str(self.directory / where)
        return Ledger(where, self.settings.ledger_sync, max_valid=self.settings.max_valid_certs,
                      supersede_grace=self.settings.supersede_grace)

    # -- issuing -------------------------------------------------------------------------------------
    def device_cert(self, public_key: Any, device_id: str, sans: Sequence[x509.GeneralName] = (),
                    days: int | None = None, extensions: Sequence[x509.ExtensionType] = ()) -> x509.Certificate:
        """A device certificate for `public_key`: from the template when nothing but the defaults is
        asked for (every EST enrollment without attestation), else built field by field (the same
        certificate either way)."""
        with token_signing():
            if not sans and not extensions and days in (None, self.settings.device_days) \
                    and self.device_template is not None:
                return self.device_template.sign(public_key, device_id)
            return authority.device_cert(self.issuer, public_key, device_id, self.settings.trust_domain,
                                         lifetime=dt.timedelta(days=days or self.settings.device_days),
                                         extra_sans=sans, extensions=extensions)

    def issue_device(self, public_key: Any, device_id: str, spki: bytes | None = None) -> Issued:
        """`device_cert` with the defaults, as DER and the facts the ledger records (`Issued`): from the
        template, nothing is parsed back; `spki`, the key's DER SubjectPublicKeyInfo, saves encoding it."""
        template = self.device_template
        if template is None:
            return Issued.of(self.device_cert(public_key, device_id))
        with token_signing():
            return template.issue(public_key, device_id, spki=spki)

    def server_cert(self, public_key: Any, cn: str, dns: Sequence[str], ips: Sequence[str],
                    days: int | None = None) -> x509.Certificate:
        try:
            with token_signing():
                return authority.server_cert(self.issuer, public_key, cn, dns, ips,
                                             lifetime=dt.timedelta(days=days or self.settings.server_days))
        except ValueError as exc:
            raise StationError(f"server certificate for {cn!r}: {exc}") from None

    def ensure_server_cert(self, host: str, ledger: Ledger) -> tuple[Path, Path]:
        """(chain file, key file) of the EST server, issued anew when missing, expiring within a
        day, or not naming `host` (the listen address) among its SANs; recorded in the ledger."""
        dns, ips = default_server_names()
        existing = storage.read_bytes(self.path(SERVER))
        if existing is not None and self.path(SERVER_KEY).exists():
            cert = load_certificates(existing, str(self.path(SERVER)))[0]
            fresh = cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
            if fresh and (host in ("0.0.0.0", "::", "") or _names(cert) >= {host}):  # noqa: S104
                return self.path(SERVER), self.path(SERVER_KEY)
        if host not in ("0.0.0.0", "::", ""):  # noqa: S104
            try:
                ipaddress.ip_address(host)
                ips = sorted({*ips, host})
            except ValueError:
                dns = sorted({*dns, host})
        key = generate("ec-p256")
        now = int(dt.datetime.now(dt.UTC).timestamp())
        row, _ = ledger.issue(f"est-server-{socket.gethostname()}", "-", now,
                              lambda: self.server_cert(key.public_key(), "tether-station", dns, ips),
                              kind="server", reuse=False)
        storage.atomic_write(self.path(SERVER_KEY), to_pem(key, None), storage.SECRET_MODE)
        storage.atomic_write(self.path(SERVER), certs_pem([row.certificate, self.issuer.cert]), storage.PUBLIC_MODE)
        return self.path(SERVER), self.path(SERVER_KEY)

    def ledger_crl(self, ledger: Ledger, now: int, days: int | None = None) -> x509.CertificateRevocationList:
        """The CRL of everything `ledger` counts as revoked at `now`: the one code path behind
        `tether-station crl` and the console's export, so both list the same entries with the same reasons.

        Reads only: a superseded certificate whose grace period has ended is listed (reason superseded,
        revoked at the end of its grace) whether or not some write has swept it into a revoked row yet.
        """
        return self.crl(revocations(ledger.rows(), now), days)

    def crl(self, revoked: Sequence[tuple[str, int] | tuple[str, int, str | None]],
            days: int | None = None) -> x509.CertificateRevocationList:
        """A CRL signed by the issuing CA listing (serial hex, revoked at[, reason]) (RFC 5280 section 5);
        a reason (an `x509.ReasonFlags` value such as "superseded") becomes the entry's CRLReason."""
        from cryptography.hazmat.primitives import hashes

        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.issuer.cert.subject)
                   .last_update(now)
                   .next_update(now + dt.timedelta(days=days or self.settings.crl_days))
                   # the CRL number must grow with every CRL; seconds since the epoch do
                   .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.issuer.key.public_key()), critical=False))
        for serial, when, *why in revoked:
            entry = (x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                     .revocation_date(dt.datetime.fromtimestamp(when, dt.UTC)))
            if why and why[0] and why[0] != "unspecified":  # RFC 5280 5.3.1: omit rather than unspecified
                entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags(why[0])), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        with token_signing():
            return builder.sign(self.issuer.key, hashes.SHA256())


def revocations(rows: Iterable[Row], now: int) -> list[tuple[str, int, str]]:
    """(serial, revoked at, reason) of each row revoked at `now` (`Row.revocation`: recorded revocations
    and superseded certificates past their grace period alike), in the order given."""
    out = []
    for row in rows:
        gone = row.revocation(now)
        if gone is not None:
            out.append((row.serial, *gone))
    return out


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName)) | {str(i) for i in san.get_values_for_type(x509.IPAddress)}


def default_server_names() -> tuple[list[str], list[str]]:
    """SANs every station server certificate carries: this host's name and loopback (thin-edge seed)."""
    return sorted({"localhost", socket.gethostname()}), ["127.0.0.1", "::1"]


# -- init --------------------------------------------------------------------------------------------------
def _write_key(path: Path, key: Any, passphrase: bytes | None) -> None:
    storage.atomic_write(path, to_pem(key, passphrase), storage.SECRET_MODE)


def _check_imported(cert: x509.Certificate, key: Any, chain: list[x509.Certificate],
                    where: str) -> list[x509.Certificate]:
    """issuing .. root from an imported CA certificate, its key and the chain to its root."""
    if not same_public_key(cert.public_key(), key.public_key()):
        raise StationError(f"{where}: the key does not belong to {subject_of(cert)} (serial {serial_of(cert)})")
    full = [cert] + [c for c in chain if c != cert]
    for c in full:
        try:
            bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise StationError(f"{where}: {subject_of(c)} (serial {serial_of(c)}) is not a CA (BasicConstraints "
                               "CA:true missing)")
    for child, parent in itertools.pairwise(full):
        if not issued_by(child, parent):
            raise StationError(f"{where}: {subject_of(child)} is not issued by the next certificate "
                               f"{subject_of(parent)}; give the chain in order up to the root") from None
    if full[-1].issuer != full[-1].subject:
        raise StationError(f"{where}: the chain ends with {subject_of(full[-1])}, which is not a self-signed "
                           "root; append the root certificate to the chain file")
    return full


def init_station(directory: str | Path, trust_domain: str = "tether.local", passphrase: bytes | None = None, *,
                 ca_import: tuple[Path, Path, Path] | None = None, ledger: str | None = None,
                 tiers: int = 2, keys: str | None = None) -> Station:
    """Create a station in `directory`: a new root (pathlen 1) and issuing CA (pathlen 0), EC P-256;
    with `tiers=1` one root (pathlen 0) that signs devices itself, so a device chain is 2 long
    (Cumulocity's cloud accepts no more, seed 004); or an imported (certificate, key, chain-to-root)
    triple. Then the ledger and the EST server certificate. Raises StationError if `directory`
    already holds a station or an input is wrong.

    `keys`, a `pkcs11:` key URI, makes the root and issuing keys inside that token (non-extractable)
    instead of files; the release key follows at `release keygen`.
    """
    target = Path(directory)
    if tiers not in (1, 2):
        raise StationError(f"--tiers {tiers}: must be 1 (one CA signs devices) or 2 (root and issuing CA)")
    if tiers == 1 and ca_import is not None:
        raise StationError("--tiers 1 makes a new CA; with --import the imported chain decides the tiers")
    try:
        check_trust_domain(trust_domain, "--trust-domain")
    except ProvisioningError as exc:
        raise StationError(str(exc)) from None
    if (target / SETTINGS).exists():
        raise StationError(f"{target} already holds a station ({SETTINGS} exists); use another directory")
    store = None
    if keys:
        if passphrase:
            raise StationError("--keys: token keys are guarded by the token's PIN; drop --passphrase-file")
        if ca_import is not None:
            raise StationError("--keys with --import: put an imported CA key into the token with the token's own "
                               "tools; init makes new keys only")
        store = open_token(keys, target, "--keys")
        try:  # log in and look before anything is written: a wrong PIN or a taken label leaves no trace
            taken = [store.label_of(label) for label in (ROOT_LABEL, ISSUING_LABEL, RELEASE_LABEL)
                     if store.exists(label)]
        except KeyStoreError as exc:
            raise StationError(f"--keys: {exc}") from None
        if taken:
            raise StationError(f"--keys: the token holds {', '.join(taken)} already (another station's keys?); "
                               "give this station another object= prefix")
    storage.ensure_dir(target, 0o700)

    def new_key(label: str) -> Any:
        if store is None:
            return generate("ec-p256")
        try:
            store.create(label)
            return store.key(label)
        except KeyStoreError as exc:
            raise StationError(f"--keys: {exc}") from None

    if ca_import is None and tiers == 1:
        issuing_key = new_key(ISSUING_LABEL)
        root = authority.root_ca(issuing_key, cn=f"Tether Device CA ({trust_domain})", pathlen=0)
        chain = [root]
    elif ca_import is None:
        root_key = new_key(ROOT_LABEL)
        root = authority.root_ca(root_key, cn=f"Tether Root CA ({trust_domain})")
        issuing_key = new_key(ISSUING_LABEL)
        issuing = authority.intermediate_ca(Issuer(root, root_key), issuing_key.public_key(),
                                            cn=f"Tether Issuing CA ({trust_domain})")
        chain = [issuing, root]
        if store is None:
            _write_key(target / ROOT_KEY, root_key, passphrase)
    else:
        cert_file, key_file, chain_file = ca_import
        try:
            cert = load_certificates(Path(cert_file).read_bytes(), str(cert_file))[0]
            extra = load_certificates(Path(chain_file).read_bytes(), str(chain_file))
            issuing_key = load_pem(Path(key_file).read_bytes(), passphrase, str(key_file))
        except OSError as exc:
            raise StationError(f"{exc.filename}: cannot read: {exc.strerror}") from None
        except (PemError, KeyStoreError) as exc:
            raise StationError(str(exc)) from None
        chain = _check_imported(cert, issuing_key, extra, f"--import {cert_file}")
        root = chain[-1]
    if store is None:
        _write_key(target / ISSUING_KEY, issuing_key, passphrase)
    storage.atomic_write(target / ROOT, certs_pem([root]), storage.PUBLIC_MODE)
    storage.atomic_write(target / CHAIN, certs_pem(chain), storage.PUBLIC_MODE)
    storage.atomic_write(target / ISSUING, certs_pem(chain[:1]), storage.PUBLIC_MODE)
    storage.ensure_dir(target / RELEASE, 0o700)
    settings = Settings(trust_domain=trust_domain, ledger=ledger or LEDGER, encrypted_keys=bool(passphrase),
                        imported=ca_import is not None, keys=keys or "")
    # station.toml last: its presence is what marks the directory as a complete station
    storage.atomic_write(target / SETTINGS, settings.render(), 0o600)
    station = Station(target, passphrase)
    led = station.open_ledger()
    try:
        station.ensure_server_cert("localhost", led)
    finally:
        led.close()
    return station
