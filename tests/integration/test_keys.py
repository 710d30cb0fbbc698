"""Key stores: file keys (0600 from the first byte, passphrase, RSA) and TPM keys (non-exportable)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from hal import KeyStoreError
from hal.keys import open_keystore
from lab.swtpm import SoftTpm
from provisioning.csr import build_csr
from tests.conftest import run_tether, write_config


def test_file_key_is_ec_p256_and_mode_0600(tmp_path: Path) -> None:
    store = open_keystore("file", tmp_path / "keys")
    store.create("device")
    path = tmp_path / "keys" / "device.key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = store.public_key("device")
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert not list((tmp_path / "keys").glob(".*tmp*")), "no temp file left behind"


@pytest.mark.parametrize("algorithm,bits", [("rsa-2048", 2048), ("rsa-3072", 3072)])
def test_file_key_rsa_on_request(tmp_path: Path, algorithm: str, bits: int) -> None:
    store = open_keystore("file", tmp_path)
    store.create("device", algorithm)
    key = store.public_key("device")
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == bits


def test_file_key_with_passphrase_is_encrypted(tmp_path: Path) -> None:
    store = open_keystore("file", tmp_path, passphrase=b"s3cret")
    store.create("device")
    data = (tmp_path / "device.key.pem").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in data
    with pytest.raises(TypeError):
        load_pem_private_key(data, password=None)
    with pytest.raises(KeyStoreError, match="passphrase"):
        open_keystore("file", tmp_path).public_key("device")
    assert store.tls_key("device").password == b"s3cret"


def test_file_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    store = open_keystore("file", tmp_path)
    store.create("device")
    (tmp_path / "device.key.pem").chmod(0o644)
    with pytest.raises(KeyStoreError, match="permissions 644"):
        store.public_key("device")


def test_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    store = open_keystore("file", tmp_path)
    store.create("device")
    before = (tmp_path / "device.key.pem").read_bytes()
    with pytest.raises(KeyStoreError, match="already exists"):
        store.create("device")
    assert (tmp_path / "device.key.pem").read_bytes() == before


def test_unknown_backend_and_algorithm_name_the_choices(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="known schemes are file:, pkcs11:, tpm:"):
        open_keystore("hsm", tmp_path)
    with pytest.raises(KeyStoreError, match="ec-p256"):
        open_keystore("file", tmp_path).create("device", "ed25519")


def test_tpm_key_signs_csr_and_stays_in_the_tpm(tmp_path: Path, softtpm: SoftTpm) -> None:
    store = open_keystore("tpm", tmp_path / "keys", tcti=softtpm.tcti)
    store.create("device")
    blob = (tmp_path / "keys" / "device.tss2.pem").read_bytes()
    assert blob.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    assert stat.S_IMODE((tmp_path / "keys" / "device.tss2.pem").stat().st_mode) == 0o600
    with pytest.raises((ValueError, TypeError)):
        load_pem_private_key(blob, password=None)  # the wrapped blob is no usable private key
    with store.signer("device") as signer:
        assert not hasattr(signer, "private_bytes") or _cannot_export(signer)
        csr = build_csr(signer, "dev-tpm", "test.tether")
    assert csr.is_signature_valid
    assert csr.public_key() == store.public_key("device")


def _cannot_export(signer: object) -> bool:
    from cryptography.hazmat.primitives import serialization

    try:
        signer.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                             serialization.NoEncryption())
    except Exception:  # tpm2-pytss refuses: the private part never leaves the TPM
        return True
    return False


def test_tpm_key_from_another_tpm_is_refused(tmp_path: Path, softtpm: SoftTpm) -> None:
    store = open_keystore("tpm", tmp_path / "keys", tcti=softtpm.tcti)
    store.create("device")
    softtpm.stop()
    other = SoftTpm(tmp_path / "other-tpm").start()
    try:
        other.apply_env()
        with pytest.raises(KeyStoreError, match="refused to load"), store.signer("device"):
            pass
    finally:
        other.stop()


def test_cli_tpm_keygen_then_csr_verifies_with_openssl(tmp_path: Path, softtpm: SoftTpm) -> None:
    config = write_config(tmp_path, "dev-tpm", keys={"tcti": softtpm.tcti})
    made = run_tether("keygen", "--backend", "tpm", config=config)
    assert made.returncode == 0, made.stderr
    csr = run_tether("csr", "--out", str(tmp_path / "dev.csr"), config=config)
    assert csr.returncode == 0, csr.stderr
    verify = subprocess.run(["openssl", "req", "-verify", "-noout", "-subject", "-in", str(tmp_path / "dev.csr")],
                            capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    assert "CN = dev-tpm" in verify.stdout
    assert "verify OK" in (verify.stdout + verify.stderr)
    assert run_tether("config", "get", "keys.backend", config=config).stdout.strip() == '"tpm"'


@pytest.mark.parametrize("keys", [
    {"uri": "tpm:{dir}?tcti={tcti}"},
    {"backend": "tpm", "tcti": "{tcti}"},  # the older spelling, as configs in the field have it
])
def test_cli_keygen_in_the_tpm_named_by_uri_or_by_backend_and_tcti(tmp_path: Path, softtpm: SoftTpm,
                                                                    keys: dict[str, str]) -> None:
    values = {k: v.format(dir=tmp_path / "tpm-keys", tcti=softtpm.tcti) for k, v in keys.items()}
    config = write_config(tmp_path, "dev-tpm", keys=values)
    made = run_tether("keygen", config=config, env={"TPM2OPENSSL_TCTI": "device:/dev/no-such-tpm"})
    assert made.returncode == 0, made.stderr
    where = tmp_path / "tpm-keys" if "uri" in keys else tmp_path / "state" / "keys"
    assert (where / "device.tss2.pem").read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    csr = run_tether("csr", config=config)
    assert csr.returncode == 0 and "BEGIN CERTIFICATE REQUEST" in csr.stdout, csr.stderr


def test_file_key_uri_with_a_passphrase_file_encrypts_the_key(tmp_path: Path) -> None:
    (tmp_path / "key.pass").write_text("s3cret\n")
    config = write_config(tmp_path, "dev-001", keys={"uri": "file:my-keys?passphrase_file=key.pass"})
    made = run_tether("keygen", config=config)
    assert made.returncode == 0, made.stderr
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "my-keys" / "device.key.pem").read_bytes()
    (tmp_path / "key.pass").write_text("")
    done = run_tether("csr", config=config)
    assert done.returncode == 1
    assert done.stderr == f"tether: error: {tmp_path / 'key.pass'}: the key passphrase file is empty; " \
                          "check [keys] passphrase_file\n"
