"""OTA manifests, signatures and signer chains as they arrive from the artifact server: only the
release's own errors (ReleaseError, VerificationError: TetherError subclasses) may escape. Manifests
are signed here with the trusted release key so the fuzzer reaches the JSON and field checks that
run after the signature, which is where a forged-but-signed manifest would be judged."""

from __future__ import annotations

import contextlib
import json

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import given
from hypothesis import strategies as st

from agent.ota.machine import Installed, Operation
from agent.ota.release import check_release
from hal.errors import TetherError
from provisioning.release import Manifest, ReleaseError, create_release_signer, verify_release
from tests.fuzz.inputs import FUZZ, json_values, mutated, scratch, tried
from tests.pki import Pki

WORK = scratch("tether-fuzz-ota-")
PKI = Pki.create(WORK / "pki")
SIGNER = create_release_signer(PKI.issuing, WORK / "signer", chain=[PKI.root.cert])
KEY = load_pem_private_key(SIGNER.key_file.read_bytes(), None)
SIGNER_PEM = SIGNER.cert_file.read_bytes()
ANCHORS = [PKI.root.cert]
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
@given(manifest_bytes, st.sampled_from(["sign", "sign", "garbage", "good-signature"]), st.binary(max_size=80),
       st.one_of(st.just(SIGNER_PEM), st.just(SIGNER_PEM), mutated([SIGNER_PEM], max_edits=3)), versions)
def test_manifests_raise_only_release_errors(data: bytes, how: str, junk: bytes, signer_pem: bytes,
                                             installed: object) -> None:
    tried("OTA manifest (verify_release + check_release)")
    sig = {"sign": sign(data), "garbage": junk, "good-signature": sign(GOOD)}[how]
    with contextlib.suppress(TetherError):
        manifest = verify_release(data, sig, signer_pem, ANCHORS)
        assert manifest.to_bytes() == data
        op = Operation(serial="dev-001", name=manifest.name, version=manifest.version, url="https://a/")
        check_release(data, sig, signer_pem, ANCHORS, op,
                      Installed(version=installed if isinstance(installed, str) else "1.0.0"))


@FUZZ
@given(st.one_of(manifests, json_values))
def test_manifest_fields_raise_only_release_errors(data: object) -> None:
    tried("OTA manifest fields (Manifest.from_dict)")
    with contextlib.suppress(ReleaseError):
        Manifest.from_dict(data)
