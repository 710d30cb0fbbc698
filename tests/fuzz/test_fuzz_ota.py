"""OTA manifests, signatures and signer chains as they arrive from the artifact server: only the
release's own errors (ReleaseError, VerificationError: TetherError subclasses) may escape. Manifests
are signed here with the trusted release key so the fuzzer reaches the JSON and field checks that
run after the signature, which is where a forged-but-signed manifest would be judged. Oracle: an
accepted release was signed by the release key (checked here with `cryptography`) whose certificate
has EKU codeSigning and chains to the anchor, and its manifest fields have the documented shapes; a
device certificate (clientAuth) signing a manifest is a seed that must be refused."""

from __future__ import annotations

import contextlib
import json
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from agent.ota.machine import Installed, Operation
from agent.ota.release import check_release
from hal import TetherError
from hal.keys.file import generate
from provisioning.certs import to_pem
from provisioning.release import Manifest, ReleaseError, create_release_signer, verify_release
from tests.fuzz.inputs import FUZZ, json_values, mutated, scratch, tried
from tests.pki import Pki

WORK = scratch("tether-fuzz-ota-")
PKI = Pki.create(WORK / "pki")
SIGNER = create_release_signer(PKI.issuing, WORK / "signer", chain=[PKI.root.cert])
KEY = load_pem_private_key(SIGNER.key_file.read_bytes(), None)
SIGNER_PEM = SIGNER.cert_file.read_bytes()
ANCHORS = [PKI.root.cert]
DEVICE_KEY = generate("ec-p256")  # a device's key and certificate, issued by the same CA as the release signer
DEVICE_PEM = to_pem(PKI.device_chain(DEVICE_KEY.public_key(), "dev-001")[:2])
GOOD = Manifest("app", "1.2.0", 1234, "ab" * 32, "1.0.0", "2026-01-01T00:00:00Z").to_bytes()

versions = st.one_of(st.sampled_from(["1.2.0", "1.0", "2.0-rc.1", "0", "1..2", "", "v1"]),
                     st.from_regex(r"[0-9.a-z-]{0,12}", fullmatch=True), json_values)
manifests = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(["app", "", "../x"]), json_values),
    "version": versions, "min_version": versions,
    "size": st.one_of(st.integers(-1, 2**70), json_values),
    "sha256": st.one_of(st.just("ab" * 32), st.text(max_size=70), json_values),
    "created": json_values,
})
manifest_bytes = st.one_of(
    manifests.map(lambda m: json.dumps(m, sort_keys=True, separators=(",", ":")).encode()),
    manifests.map(lambda m: json.dumps(m).encode()),
    mutated([GOOD]),
    st.binary(max_size=200),
)


def sign(data: bytes) -> bytes:
    return KEY.sign(data, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr, call-arg]


@FUZZ
@given(manifest_bytes, st.sampled_from(["sign", "sign", "garbage", "good-signature", "device"]),
       st.binary(max_size=80),
       st.one_of(st.just(SIGNER_PEM), st.just(SIGNER_PEM), mutated([SIGNER_PEM], max_edits=3), st.just(DEVICE_PEM)),
       versions)
def test_manifests_raise_only_release_errors(data: bytes, how: str, junk: bytes, signer_pem: bytes,
                                             installed: object) -> None:
    tried("OTA manifest (verify_release + check_release)")
    if how == "device":  # a device's key signs, and its certificate is offered as the signer
        sig, signer_pem = DEVICE_KEY.sign(data, ec.ECDSA(hashes.SHA256())), DEVICE_PEM
    else:
        sig = {"sign": sign(data), "garbage": junk, "good-signature": sign(GOOD)}[how]
    with contextlib.suppress(TetherError):
        manifest = verify_release(data, sig, signer_pem, ANCHORS)
        assert manifest.to_bytes() == data
        assert_release_sound(data, sig, signer_pem, manifest)
        op = Operation(serial="dev-001", name=manifest.name, version=manifest.version, url="https://a/")
        check_release(data, sig, signer_pem, ANCHORS, op,
                      Installed(version=installed if isinstance(installed, str) else "1.0.0"))


def assert_release_sound(data: bytes, sig: bytes, signer_pem: bytes, manifest: Manifest) -> None:
    """What verify_release must have refused, checked again without it."""
    leaf, *rest = x509.load_pem_x509_certificates(signer_pem)
    leaf.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, union-attr]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CODE_SIGNING in eku, leaf
    leaf.verify_directly_issued_by(rest[0] if rest else PKI.issuing.cert)
    assert_fields_sound(manifest)


def assert_fields_sound(manifest: Manifest) -> None:
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", manifest.name), manifest
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)*(-[0-9A-Za-z.]+)?", manifest.version), manifest
    assert manifest.min_version is None or re.fullmatch(r"[0-9]+(\.[0-9]+)*(-[0-9A-Za-z.]+)?", manifest.min_version)
    assert type(manifest.size) is int and manifest.size >= 0, manifest
    assert re.fullmatch(r"[0-9a-f]{64}", manifest.sha256) and isinstance(manifest.created, str), manifest


@FUZZ
@given(st.one_of(manifests, json_values))
def test_manifest_fields_raise_only_release_errors(data: object) -> None:
    tried("OTA manifest fields (Manifest.from_dict)")
    with contextlib.suppress(ReleaseError):
        assert_fields_sound(Manifest.from_dict(data))
