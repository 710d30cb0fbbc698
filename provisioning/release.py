"""Signed OTA releases: the station's release-signing key, signing a payload, verifying on the device.

A release directory holds four files (DESIGN.md "OTA"):
    manifest.json   canonical JSON (sorted keys, no whitespace): name, version, size, sha256, min_version, created
    manifest.sig    detached signature over exactly those bytes (ECDSA P-256 / SHA-256, DER; or RSA PKCS#1 v1.5)
    signer.pem      the release-signing certificate (EKU codeSigning) followed by its issuers
    payload         the payload itself

The device trusts a release when the signer certificate chains to one of its trust anchors (the
station's root) with codeSigning, the signature verifies over the manifest bytes it received, and the
manifest is canonical. Size, hash and version checks against the payload are the updater's job.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from hal import storage
from hal.keys.file import generate
from hal.keys.file import to_pem as key_to_pem
from provisioning import PemError, ReleaseError, authority, bundles
from provisioning.certs import load_certificates, same_public_key, serial_of, subject_of, to_pem
from provisioning.policy import ChainPolicy, extension

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SIGNER = "signer.pem"
PAYLOAD = "payload"
KEY_FILE = "release.key"
CERT_FILE = "release.pem"
MAX_MANIFEST = 64 * 1024
# Dotted numbers with an optional pre-release suffix ("1.4.0", "2.0-rc.1"); the device compares them
# with agent.core.version, which accepts exactly this shape.
VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){0,7}(-[0-9A-Za-z]+(\.[0-9A-Za-z]+)*)?$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """What a release promises about its payload."""

    name: str
    version: str
    size: int
    sha256: str
    min_version: str | None
    created: str

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed: JSON with sorted keys and no whitespace."""
        return canonical(asdict(self))

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        """Check types and shapes; ReleaseError naming the field otherwise."""
        if not isinstance(data, dict):
            raise ReleaseError(f"{where}: expected a JSON object")
        expected = {"name", "version", "size", "sha256", "min_version", "created"}
        if set(data) != expected:
            raise ReleaseError(f"{where}: fields {sorted(data)}, expected {sorted(expected)}")
        name, version, size, digest = data["name"], data["version"], data["size"], data["sha256"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ReleaseError(f"{where}: name {name!r} is not a release name")
        for field in ("version", "min_version"):
            value = data[field]
            if (field == "version" or value is not None) and not (isinstance(value, str) and VERSION_RE.match(value)):
                raise ReleaseError(f"{where}: {field} {value!r} is not a dotted version (e.g. 1.4.0 or 1.4.0-rc1)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ReleaseError(f"{where}: size {size!r} is not a byte count")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ReleaseError(f"{where}: sha256 {digest!r} is not 64 lowercase hex digits")
        if not isinstance(data["created"], str):
            raise ReleaseError(f"{where}: created {data['created']!r} is not a timestamp string")
        return cls(name, version, size, digest, data["min_version"], data["created"])


def canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class ReleaseSigner:
    """Where `create_release_signer` put the key and the certificate chain."""

    key_file: Path
    cert_file: Path
    certificate: x509.Certificate
    in_token: bool = False  # the key is a token's (no key_file written)

    def __str__(self) -> str:  # what `tether-station release keygen` prints
        where = "in the token" if self.in_token else f"{self.key_file} (0600)"
        return (f"release-signing key {where}, certificate {self.cert_file}: "
                f"{subject_of(self.certificate)} serial {serial_of(self.certificate)}, EKU codeSigning, "
                f"valid until {self.certificate.not_valid_after_utc:%Y-%m-%d}")


def create_release_signer(issuer: authority.Issuer, directory: Path, *, chain: Sequence[x509.Certificate] = (),
                          overwrite: bool = False, key: Any = None) -> ReleaseSigner:
    """Make a release-signing key (`release.key`, mode 0600) and a code-signing certificate from `issuer`.

    `release.pem` holds the certificate, the issuer's certificate and `chain` (the issuer's own issuers,
    up to the station root), so a device can build the path to its trust anchor. Raises ReleaseError if
    a key exists and `overwrite` is false: replacing it silently would orphan releases in flight.
    `key`, a token key's handle (the station's `--keys pkcs11:`), is certified instead: no key file is written.
    """
    directory = Path(directory)
    key_file, cert_file = directory / KEY_FILE, directory / CERT_FILE
    if (key_file.exists() or (key is not None and cert_file.exists())) and not overwrite:
        raise ReleaseError(f"{key_file if key is None else cert_file}: a release-signing key exists already; "
                           "pass overwrite to replace it")
    storage.ensure_dir(directory)
    in_token = key is not None
    if key is None:
        key = generate("ec-p256")
    cert = authority.code_signing_cert(issuer, key.public_key())
    if not in_token:
        storage.atomic_write(key_file, key_to_pem(key, None), storage.SECRET_MODE)
    storage.atomic_write(cert_file, to_pem([cert, issuer.cert, *chain]), storage.PUBLIC_MODE)
    return ReleaseSigner(key_file, cert_file, cert, in_token)


def _sign(key: Any, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    raise ReleaseError(f"release key type {type(key).__name__} is unsupported: expected EC P-256 or RSA")


def sign_release(release_dir: Path, name: str, version: str, payload: Path, out_dir: Path,
                 min_version: str | None = None, key: Any = None) -> dict[str, Any]:
    """Sign `payload` as release `name` `version` into `out_dir` (manifest.json, manifest.sig, signer.pem, payload).

    `release_dir` is where `create_release_signer` put the key. Returns the manifest as a dict.
    Raises ReleaseError for a bad name or version, a missing key or payload. `key`: a token key's handle
    that signs instead of release.key.
    """
    if not NAME_RE.match(name):
        raise ReleaseError(f"release name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    for field, value in (("version", version), ("min_version", min_version)):
        if value is not None and not VERSION_RE.match(value):
            raise ReleaseError(f"{field} {value!r} is not a dotted version (e.g. 1.4.0 or 1.4.0-rc1)")
    release_dir, out_dir = Path(release_dir), Path(out_dir)
    key_pem = storage.read_bytes(release_dir / KEY_FILE) if key is None else b""
    chain_pem = storage.read_bytes(release_dir / CERT_FILE)
    if key_pem is None or chain_pem is None:
        raise ReleaseError(f"{release_dir}: no release-signing key; run `tether-station release keygen` first")
    if key is None:
        key = serialization.load_pem_private_key(key_pem, password=None)
    storage.ensure_dir(out_dir, 0o755)
    digest, size = hashlib.sha256(), 0
    tmp = out_dir / f".{PAYLOAD}.tmp-{os.getpid()}"
    try:
        with open(payload, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out_dir / PAYLOAD)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ReleaseError(f"{payload}: cannot copy the payload into {out_dir}: {exc.strerror}") from exc
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = Manifest(name, version, size, digest.hexdigest(), min_version, created)
    data = manifest.to_bytes()
    storage.atomic_write(out_dir / SIGNER, chain_pem, storage.PUBLIC_MODE)
    storage.atomic_write(out_dir / SIGNATURE, _sign(key, data), storage.PUBLIC_MODE)
    storage.atomic_write(out_dir / MANIFEST, data, storage.PUBLIC_MODE)
    return asdict(manifest)


def sign_bundle(release_dir: Path, name: str, version: str, fmt: str, source: Path, out_dir: Path,
                min_version: str | None = None) -> dict[str, Any]:
    """Build a `fmt` bundle (swu, raucb, tar: `provisioning.bundles`) from `source` and sign it as the payload.

    The bundle's own signature (SWUpdate's CMS, RAUC's) is made with the same release key as the manifest.
    Raises ReleaseError (a BundleError) naming what is missing or inconsistent.
    """
    import tempfile

    if not VERSION_RE.match(version):
        raise ReleaseError(f"version {version!r} is not a dotted version (e.g. 1.4.0 or 1.4.0-rc1)")
    storage.ensure_dir(Path(out_dir), 0o755)
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=out_dir) as tmp:
        bundle = bundles.build(fmt, Path(release_dir), Path(source), version, Path(tmp) / f"bundle.{fmt}")
        return sign_release(release_dir, name, version, bundle, out_dir, min_version)


def _verify_signature(cert: x509.Certificate, data: bytes, sig: bytes) -> bool:
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _anchored(top: x509.Certificate, anchors: Sequence[x509.Certificate]) -> bool:
    for anchor in anchors:
        if anchor.subject == top.subject and same_public_key(anchor.public_key(), top.public_key()):
            return True
        if top.issuer == anchor.subject and ChainPolicy.signed_by(top, anchor):
            return True
    return False


def check_signer(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
                 now: dt.datetime | None = None) -> None:
    """Raise ReleaseError unless `chain` (signer first) is a valid code-signing chain to one of `anchors`."""
    if not chain:
        raise ReleaseError("signer.pem holds no certificate")
    if not anchors:
        raise ReleaseError("no trust anchors configured for release signers ([ota] trust_anchor)")
    now = now or dt.datetime.now(dt.UTC)
    policy = ChainPolicy()
    leaf = chain[0]
    s, n = subject_of(leaf), serial_of(leaf)
    problems = [str(v) for v in policy.certificate_violations(leaf, now)]
    eku = extension(leaf, x509.ExtendedKeyUsage)  # None also for an unparsable extension block
    if eku is None:
        problems.append(f"signer {s} (serial {n}): no readable ExtendedKeyUsage, codeSigning required")
    elif ExtendedKeyUsageOID.CODE_SIGNING not in eku.value:
        problems.append(f"signer {s} (serial {n}): ExtendedKeyUsage lacks codeSigning")
    for i, cert in enumerate(chain[1:], 1):
        issuer_problems = policy.certificate_violations(cert, now) + policy.issuer_violations(cert, below=i - 1)
        problems += [str(v) for v in issuer_problems]
    for child, parent in itertools.pairwise(chain):
        problems += [str(v) for v in policy.link_violations(child, parent)]
    if not problems and not _anchored(chain[-1], anchors):
        problems.append(f"signer {s} (serial {n}) does not chain to a trusted release authority "
                        f"(top of chain: {subject_of(chain[-1])}, issued by {chain[-1].issuer.rfc4514_string()})")
    if problems:
        raise ReleaseError("release signer rejected: " + "; ".join(problems))


def verify_release(manifest_bytes: bytes, sig: bytes, signer_chain_pem: bytes,
                   trust_anchors: Sequence[x509.Certificate], now: dt.datetime | None = None) -> Manifest:
    """Check the signer chain (codeSigning, up to a trust anchor) and the signature; return the manifest.

    Raises ReleaseError saying which check failed: signer chain, signature, or manifest content.
    """
    if len(manifest_bytes) > MAX_MANIFEST:
        raise ReleaseError(f"manifest of {len(manifest_bytes)} bytes is over the {MAX_MANIFEST}-byte limit")
    try:
        chain = load_certificates(signer_chain_pem, "signer.pem")
    except PemError as exc:
        raise ReleaseError(f"release signer unreadable: {exc}") from exc
    check_signer(chain, trust_anchors, now)
    if not _verify_signature(chain[0], manifest_bytes, sig):
        raise ReleaseError(f"manifest signature does not verify with the signer {subject_of(chain[0])} "
                           f"(serial {serial_of(chain[0])}): signed by another key, or altered")
    try:
        data = json.loads(manifest_bytes)
    except ValueError as exc:
        raise ReleaseError(f"manifest is not JSON: {exc}") from exc
    manifest = Manifest.from_dict(data)
    if manifest.to_bytes() != manifest_bytes:
        raise ReleaseError("manifest is not in canonical form (sorted keys, no whitespace)")
    return manifest
