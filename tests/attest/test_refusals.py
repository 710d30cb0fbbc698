"""Every refusal of attested enrollment, each sent to the real station by a real TPM (swtpm) and each
leaving its reason in the ledger's refusal records (`est_events`)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hal.keys.file import FileKeyStore
from hal.keys.tpm import TpmKeyStore
from hal.keys.tpm_attest import TpmAttester
from lab.swtpm import EkCa, SoftTpm
from provisioning import authority
from provisioning.attest import tpm2
from provisioning.attest.evidence import TpmCertify, build_csr
from provisioning.attest.verify import ek_digest
from tests.attest.conftest import TCTI, attest_config, trust_maker
from tests.conftest import run_tether
from tests.station.conftest import RunningStation, start_station

PREFIX = "/.well-known/est/attest"


class Device:
    """One device's side of the exchange, step by step, so a test can change any step."""

    def __init__(self, station: RunningStation, keys: Path, device_id: str = "dev-a") -> None:
        self.station = station
        self.device_id = device_id
        self.store = TpmKeyStore(keys, tcti=TCTI)
        if not self.store.exists("device"):
            self.store.create("device")

    def post(self, operation: str, body: bytes, content_type: str, user: str | None = None,
             password: str | None = None) -> requests.Response:
        auth = (user, password) if user is not None and password is not None else None
        return requests.post(f"{self.station.url}{PREFIX}/{operation}", data=body, auth=auth, timeout=30,
                             headers={"Content-Type": content_type}, verify=str(self.station.ca_file))

    def start(self, tpm: TpmAttester, device_id: str | None = None,
              ak_public: bytes | None = None) -> requests.Response:
        assert tpm.endorsement is not None
        doc = {"device_id": device_id or self.device_id,
               "ek_certificate": base64.b64encode(tpm.endorsement.certificate).decode(),
               "ek_public": base64.b64encode(tpm.endorsement.public).decode(),
               "ak_public": base64.b64encode(ak_public or tpm.ak_public).decode()}
        return self.post("start", json.dumps(doc).encode(), "application/json")

    def challenge(self, tpm: TpmAttester, device_id: str | None = None) -> dict[str, bytes]:
        answer = self.start(tpm, device_id)
        assert answer.status_code == 200, answer.text
        return {k: base64.b64decode(v) for k, v in answer.json().items()
                if k in ("credential_blob", "encrypted_secret", "nonce")}

    def csr(self, evidence: TpmCertify, label: str = "device", key: Any = None) -> bytes:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)])
        if key is not None:
            return base64.encodebytes(build_csr(subject, key, evidence).public_bytes(_der()))
        with self.store.signer(label) as signer:
            return base64.encodebytes(build_csr(subject, signer, evidence).public_bytes(_der()))

    def enroll(self, secret: bytes, csr: bytes, user: str | None = None) -> requests.Response:
        return self.post("simpleenroll", csr, "application/pkcs10", user or self.device_id, secret.hex())

    def certify(self, tpm: TpmAttester, nonce: bytes, label: str = "device") -> TpmCertify:
        c = tpm.certify(label, nonce)
        return TpmCertify(c.attest, c.signature, c.public)


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def refusals(station: RunningStation, operation: str) -> list[tuple[str, int, str]]:
    ledger = station.ledger()
    try:
        with ledger.db.transaction(write=False) as q:
            return [(d, int(s), r) for d, s, r in q("SELECT device_id, status, reason FROM est_events WHERE "
                                                      "operation = ? ORDER BY id", (operation,))]
    finally:
        ledger.close()


@pytest.fixture
def device(tmp_path: Path, attest_station: RunningStation, attested_tpm: SoftTpm) -> Device:
    return Device(attest_station, tmp_path / "keys")


@pytest.fixture
def tpm(device: Device) -> Iterator[TpmAttester]:
    with TpmAttester(device.store, "rsa") as session:
        yield session


def test_an_ek_from_an_untrusted_maker_is_refused(tmp_path: Path, station_dir: Path, attested_tpm: SoftTpm) -> None:
    other = authority.root_ca(ec.generate_private_key(ec.SECP256R1()), cn="Some Other TPM Maker")
    (station_dir / "ek-roots.pem").write_bytes(other.public_bytes(_der().PEM))
    toml = station_dir / "station.toml"
    toml.write_text(toml.read_text().replace('ek_roots = ""', 'ek_roots = "ek-roots.pem"'))
    station = start_station(station_dir, workers=1)
    try:
        device = Device(station, tmp_path / "keys")
        with TpmAttester(device.store) as tpm:
            answer = device.start(tpm)
        assert answer.status_code == 403
        assert "not issued by a TPM maker this station trusts" in answer.text
        assert refusals(station, "attest/start") == [("dev-a", 403, answer.text.strip())]
    finally:
        station.proc.stop()


def test_an_ek_off_the_allow_list_is_refused_until_registered(tmp_path: Path, station_dir: Path, ek_ca: EkCa,
                                                              attested_tpm: SoftTpm) -> None:
    trust_maker(station_dir, ek_ca, ek_allowlist=True)
    station = start_station(station_dir, workers=1)
    try:
        config = attest_config(tmp_path, station, "dev-a", enroll={"method": "tpm-attestation", "ek": "rsa"})
        out = run_tether("enroll", config=config)
        assert out.returncode != 0 and "not on the station's EK allow-list" in out.stderr
        [(who, status, reason)] = refusals(station, "attest/start")
        assert (who, status) == ("dev-a", 403) and "allow-list" in reason
        with TpmAttester(TpmKeyStore(tmp_path / "probe", tcti=TCTI), "rsa") as tpm:
            assert tpm.endorsement is not None
            digest = ek_digest(x509.load_der_x509_certificate(tpm.endorsement.certificate))
        wrong = station.cli("attest", "allow", "--batch", "line-2", "--device", "dev-other", digest)
        assert wrong.returncode == 0
        out = run_tether("enroll", config=config)
        assert out.returncode != 0 and "registered for device 'dev-other'" in out.stderr
        station.cli("attest", "allow", "--batch", "line-2", "--device", "dev-a", digest)
        assert digest in station.cli("attest", "list").stdout
        out = run_tether("enroll", config=config)
        assert out.returncode == 0, out.stderr
    finally:
        station.proc.stop()


def test_an_ak_from_outside_the_eks_tpm_cannot_activate_the_credential(device: Device, tpm: TpmAttester) -> None:
    from hal import KeyStoreError

    outside = tpm2.marshal_public(ec.generate_private_key(ec.SECP256R1()).public_key(),
                                  tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN | tpm2.RESTRICTED
                                  | tpm2.SIGN | tpm2.USER_WITH_AUTH, scheme=tpm2.ALG_ECDSA)
    answer = device.start(tpm, ak_public=outside)
    assert answer.status_code == 200, answer.text  # the station cannot tell: only the TPM can
    doc = answer.json()
    with pytest.raises(KeyStoreError, match="could not activate"):
        tpm.activate(base64.b64decode(doc["credential_blob"]), base64.b64decode(doc["encrypted_secret"]))
    evidence = device.certify(tpm, base64.b64decode(doc["nonce"]))
    refused = device.enroll(os.urandom(32), device.csr(evidence))
    assert refused.status_code == 401 and "not the secret of any open TPM credential" in refused.text
    assert refusals(device.station, "attest/simpleenroll") == [("dev-a", 401, refused.text.strip())]
    assert device.station.rows("dev-a") == []


def test_a_software_key_in_the_csr_is_refused(tmp_path: Path, device: Device, tpm: TpmAttester) -> None:
    from cryptography.hazmat.primitives import serialization
    from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPM2B_SENSITIVE, TPMA_OBJECT, TPMT_SIG_SCHEME

    challenge = device.challenge(tpm)
    secret = tpm.activate(challenge["credential_blob"], challenge["encrypted_secret"])
    soft = ec.generate_private_key(ec.SECP256R1())
    pem = soft.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    # a key made outside the TPM, loaded into it so the AK can certify it (TPM2_LoadExternal)
    ectx = tpm._ectx
    handle = ectx.load_external(TPM2B_PUBLIC.from_pem(pem, objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT
                                                      | TPMA_OBJECT.USERWITHAUTH),
                                TPM2B_SENSITIVE.from_pem(pem))
    attest, signature = ectx.certify(handle, tpm._ak, challenge["nonce"], TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
    public, _, _ = ectx.read_public(handle)
    evidence = TpmCertify(bytes(attest.marshal())[2:], bytes(signature.marshal()), bytes(public.publicArea.marshal()))
    refused = device.enroll(secret, device.csr(evidence, key=soft))
    assert refused.status_code == 403
    assert "lacks fixedTPM, fixedParent, sensitiveDataOrigin" in refused.text
    assert refusals(device.station, "attest/simpleenroll") == [("dev-a", 403, refused.text.strip())]


def test_a_certify_over_another_key_than_the_csrs_is_refused(device: Device, tpm: TpmAttester) -> None:
    device.store.create("other")
    challenge = device.challenge(tpm)
    secret = tpm.activate(challenge["credential_blob"], challenge["encrypted_secret"])
    evidence = device.certify(tpm, challenge["nonce"], "other")
    refused = device.enroll(secret, device.csr(evidence, "device"))
    assert refused.status_code == 403 and "the certified key is not the CSR's key" in refused.text
    assert refusals(device.station, "attest/simpleenroll") == [("dev-a", 403, refused.text.strip())]


def test_a_file_key_csr_with_a_tpm_keys_certify_is_refused(tmp_path: Path, device: Device,
                                                           tpm: TpmAttester) -> None:
    files = FileKeyStore(tmp_path / "filekeys")
    files.create("device")
    challenge = device.challenge(tpm)
    secret = tpm.activate(challenge["credential_blob"], challenge["encrypted_secret"])
    evidence = device.certify(tpm, challenge["nonce"])
    with files.signer("device") as soft:
        refused = device.enroll(secret, device.csr(evidence, key=soft))
    assert refused.status_code == 403 and "not the CSR's key" in refused.text


def test_a_certify_over_an_earlier_nonce_is_refused(device: Device, tpm: TpmAttester) -> None:
    first = device.challenge(tpm)
    old = device.certify(tpm, first["nonce"])
    second = device.challenge(tpm)  # replaces the first challenge of this EK
    secret = tpm.activate(second["credential_blob"], second["encrypted_secret"])
    refused = device.enroll(secret, device.csr(old))
    assert refused.status_code == 403 and "extraData is not the nonce of this challenge" in refused.text
    assert refusals(device.station, "attest/simpleenroll") == [("dev-a", 403, refused.text.strip())]


def test_a_replaced_or_spent_credential_is_refused(device: Device, tpm: TpmAttester) -> None:
    first = device.challenge(tpm)
    first_secret = tpm.activate(first["credential_blob"], first["encrypted_secret"])
    second = device.challenge(tpm)
    refused = device.enroll(first_secret, device.csr(device.certify(tpm, first["nonce"])))
    assert refused.status_code == 401, refused.text  # replaced by the newer challenge for the same EK
    secret = tpm.activate(second["credential_blob"], second["encrypted_secret"])
    csr = device.csr(device.certify(tpm, second["nonce"]))
    issued = device.enroll(secret, csr)
    assert issued.status_code == 200, issued.text
    assert device.enroll(secret, csr).content == issued.content  # a crash-retry: the same certificate
    replay = device.enroll(secret, device.csr(device.certify(tpm, second["nonce"])))  # a new CSR: spent
    assert replay.status_code == 401 and "was already used" in replay.text
    assert [s for _, s, _ in refusals(device.station, "attest/simpleenroll")] == [401, 401]
    assert len(device.station.rows("dev-a")) == 1


def test_one_devices_attestation_cannot_enroll_another_device(device: Device, tpm: TpmAttester) -> None:
    challenge = device.challenge(tpm)
    secret = tpm.activate(challenge["credential_blob"], challenge["encrypted_secret"])
    evidence = device.certify(tpm, challenge["nonce"])
    other = Device(device.station, device.store.directory, "dev-b")
    refused = other.enroll(secret, other.csr(evidence))
    assert refused.status_code == 403 and "made for device 'dev-a', not 'dev-b'" in refused.text
    assert device.enroll(secret, device.csr(evidence)).status_code == 200
    again = other.start(tpm)  # the same EK, now bound to dev-a, asking for dev-b
    assert again.status_code == 403 and "already enrolled device 'dev-a'" in again.text
    assert [(d, s) for d, s, _ in refusals(device.station, "attest/simpleenroll")] == [("dev-b", 403)]
    assert [(d, s) for d, s, _ in refusals(device.station, "attest/start")] == [("dev-b", 403)]
    assert device.station.rows("dev-b") == []


def test_a_start_by_someone_holding_only_the_ek_certificate_does_not_cancel_the_devices_challenge(
        device: Device, tpm: TpmAttester) -> None:
    challenge = device.challenge(tpm)
    # EK certificates are public: anyone can send this EK with an AK of their own
    other_ak = tpm2.marshal_public(ec.generate_private_key(ec.SECP256R1()).public_key(),
                                   tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN | tpm2.RESTRICTED
                                   | tpm2.SIGN | tpm2.USER_WITH_AUTH, scheme=tpm2.ALG_ECDSA)
    for _ in range(5):
        assert device.start(tpm, ak_public=other_ak).status_code == 200
    secret = tpm.activate(challenge["credential_blob"], challenge["encrypted_secret"])
    issued = device.enroll(secret, device.csr(device.certify(tpm, challenge["nonce"])))
    assert issued.status_code == 200, issued.text


def test_an_ak_that_is_not_a_restricted_signing_key_is_refused(device: Device, tpm: TpmAttester) -> None:
    # an unrestricted key signs any digest, so a "TPMS_ATTEST" it signed could have been written by anyone
    loose = tpm2.marshal_public(ec.generate_private_key(ec.SECP256R1()).public_key(),
                                tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN | tpm2.SIGN
                                | tpm2.USER_WITH_AUTH, scheme=tpm2.ALG_ECDSA)
    refused = device.start(tpm, ak_public=loose)
    assert refused.status_code == 403 and "lacks restricted" in refused.text
    assert refusals(device.station, "attest/start") == [("dev-a", 403, refused.text.strip())]


def test_an_ek_public_area_that_is_not_the_certificates_key_is_refused(device: Device, tpm: TpmAttester) -> None:
    assert tpm.endorsement is not None
    other = tpm2.marshal_public(ec.generate_private_key(ec.SECP384R1()).public_key(),
                                tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN | tpm2.RESTRICTED
                                | tpm2.DECRYPT, symmetric=(tpm2.ALG_AES, 256, tpm2.ALG_CFB))
    doc = {"device_id": "dev-a", "ek_certificate": base64.b64encode(tpm.endorsement.certificate).decode(),
           "ek_public": base64.b64encode(other).decode(), "ak_public": base64.b64encode(tpm.ak_public).decode()}
    refused = device.post("start", json.dumps(doc).encode(), "application/json")
    assert refused.status_code == 403 and "is not the key of the EK certificate" in refused.text


def test_a_genuine_tpm_cannot_take_over_a_device_that_enrolled_another_way(tmp_path: Path, device: Device,
                                                                           tpm: TpmAttester) -> None:
    from provisioning.csr import build_csr as plain_csr
    from provisioning.est.client import BasicAuth, EstClient
    from tests.pki import TRUST_DOMAIN

    station = device.station
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("dev-a", station.otp("dev-a"))) as client:
        client.simpleenroll(plain_csr(ec.generate_private_key(ec.SECP256R1()), "dev-a", TRUST_DOMAIN))
    refused = device.start(tpm)
    assert refused.status_code == 403
    assert "already enrolled with a one-time password or bootstrap certificate" in refused.text
    assert refusals(station, "attest/start") == [("dev-a", 403, refused.text.strip())]
    # another TPM's EK recorded for the device: the same
    ledger = station.ledger()
    with ledger.db.transaction() as q:
        q("UPDATE certs SET ek_digest = ? WHERE device_id = 'dev-a'", ("sha256:" + "00" * 32,))
    ledger.close()
    refused = device.start(tpm)
    assert refused.status_code == 403 and f"already enrolled with EK sha256:{'00' * 32}" in refused.text
    # the operator says this TPM replaces the old one: bound on the allow-list, it enrolls
    assert tpm.endorsement is not None
    digest = ek_digest(x509.load_der_x509_certificate(tpm.endorsement.certificate))
    station.cli("attest", "allow", "--batch", "repair", "--device", "dev-a", digest)
    challenge = device.challenge(tpm)
    secret = tpm.activate(challenge["credential_blob"], challenge["encrypted_secret"])
    assert device.enroll(secret, device.csr(device.certify(tpm, challenge["nonce"]))).status_code == 200


def test_a_device_enrolled_another_way_during_the_challenge_is_refused_at_issuance(device: Device,
                                                                                  tpm: TpmAttester) -> None:
    from provisioning.csr import build_csr as plain_csr
    from provisioning.est.client import BasicAuth, EstClient
    from tests.pki import TRUST_DOMAIN

    challenge = device.challenge(tpm)  # open before the device id was taken
    station = device.station
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("dev-a", station.otp("dev-a"))) as client:
        client.simpleenroll(plain_csr(ec.generate_private_key(ec.SECP256R1()), "dev-a", TRUST_DOMAIN))
    secret = tpm.activate(challenge["credential_blob"], challenge["encrypted_secret"])
    refused = device.enroll(secret, device.csr(device.certify(tpm, challenge["nonce"])))
    assert refused.status_code == 403 and "already enrolled with a one-time password" in refused.text
    assert len(station.rows("dev-a")) == 1
