"""tpm2-tools (Debian) as the outside peer of our TPM structures: `tpm2_activatecredential` opens a
credential the station made, the station's verifier takes `tpm2_certify`'s output (and refuses it
tampered), and our MakeCredential writes what `tpm2_makecredential` writes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
import requests

from lab.swtpm import SoftTpm
from provisioning.attest import AttestError
from provisioning.attest.credential import make_credential, read_tools_file
from provisioning.attest.evidence import TpmCertify
from provisioning.attest.tpm2 import Public
from provisioning.attest.verify import check_certify
from tests.conftest import require_tool
from tests.station.conftest import RunningStation

EK_RSA = "0x81010001"  # where swtpm_setup made the RSA EK persistent (TCG provisioning guidance)


def tools(*args: str, cwd: Path) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, check=False, cwd=cwd, env=os.environ.copy(),
                         timeout=60)
    assert out.returncode == 0, f"{' '.join(args)}: {out.stderr}"
    return out.stdout


def tpmt(path: Path) -> bytes:
    """A tpm2-tools TSS public file (TPM2B_PUBLIC) as TPMT_PUBLIC."""
    return path.read_bytes()[2:]


@pytest.fixture
def work(tmp_path: Path, attested_tpm: SoftTpm) -> Path:
    for tool in ("tpm2_createak", "tpm2_activatecredential", "tpm2_makecredential", "tpm2_certify"):
        require_tool(tool)
    directory = tmp_path / "tools"
    directory.mkdir()
    tools("tpm2_readpublic", "-c", EK_RSA, "-o", "ek.pub", cwd=directory)
    tools("tpm2_createak", "-C", EK_RSA, "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa", "-u", "ak.pub",
          "-n", "ak.name", cwd=directory)
    return directory


def activate(work: Path, credential: Path) -> bytes:
    tools("tpm2_startauthsession", "--policy-session", "-S", "session.ctx", cwd=work)
    tools("tpm2_policysecret", "-S", "session.ctx", "-c", "e", cwd=work)
    tools("tpm2_activatecredential", "-c", "ak.ctx", "-C", EK_RSA, "-i", str(credential), "-o", "secret.out",
          "-P", "session:session.ctx", cwd=work)
    tools("tpm2_flushcontext", "session.ctx", cwd=work)
    return (work / "secret.out").read_bytes()


def test_tpm2_activatecredential_opens_the_credential_the_station_made(work: Path,
                                                                      attest_station: RunningStation) -> None:
    tools("tpm2_nvread", "0x01c00002", "-o", "ek.crt", cwd=work)
    der = (work / "ek.crt").read_bytes()
    der = der[:4 + int.from_bytes(der[2:4], "big")]
    doc = {"device_id": "dev-tools", "ek_certificate": base64.b64encode(der).decode(),
           "ek_public": base64.b64encode(tpmt(work / "ek.pub")).decode(),
           "ak_public": base64.b64encode(tpmt(work / "ak.pub")).decode()}
    answer = requests.post(f"{attest_station.url}/.well-known/est/attest/start", data=json.dumps(doc), timeout=30,
                           headers={"Content-Type": "application/json"}, verify=str(attest_station.ca_file))
    assert answer.status_code == 200, answer.text
    challenge = answer.json()
    blob, secret = (base64.b64decode(challenge[k]) for k in ("credential_blob", "encrypted_secret"))
    (work / "station.cred").write_bytes(b"\xba\xdc\xc0\xde\x00\x00\x00\x01" + len(blob).to_bytes(2, "big") + blob
                                        + len(secret).to_bytes(2, "big") + secret)
    recovered = activate(work, work / "station.cred")
    assert len(recovered) == 32
    # the secret is what the station stored the digest of: it enrolls (no CSR here: a wrong one is 400, not 401)
    wrong = requests.post(f"{attest_station.url}/.well-known/est/attest/simpleenroll", data=b"x", timeout=30,
                          auth=("dev-tools", recovered.hex()), headers={"Content-Type": "application/pkcs10"},
                          verify=str(attest_station.ca_file))
    assert wrong.status_code == 400, wrong.text


def test_our_make_credential_and_tpm2_makecredential_agree_in_format(work: Path) -> None:
    secret = os.urandom(32)
    (work / "secret.in").write_bytes(secret)
    name = (work / "ak.name").read_bytes()
    tools("tpm2_makecredential", "-T", "none", "-u", "ek.pub", "-s", "secret.in", "-n", name.hex(), "-o",
          "tools.cred", cwd=work)
    ours = make_credential(Public.parse(tpmt(work / "ek.pub")), name, secret)
    (work / "ours.cred").write_bytes(ours.tools_file())
    theirs = (work / "tools.cred").read_bytes()
    assert theirs[:8] == ours.tools_file()[:8]  # magic 0xBADCC0DE, version 1
    their_blob, their_secret = read_tools_file(theirs)
    assert (len(their_blob), len(their_secret)) == (len(ours.id_object), len(ours.encrypted_secret))
    assert activate(work, work / "ours.cred") == secret
    assert activate(work, work / "tools.cred") == secret


def test_the_verifier_accepts_tpm2_certify_and_refuses_it_tampered(work: Path) -> None:
    # tpm2-tools 5.4 (Debian bookworm) has no qualifying-data option for tpm2_certify: it always certifies
    # over the fixed bytes 00 ff 55 aa, so the verifier is given those as the nonce here, and refuses the
    # same attestation for a station's nonce
    nonce = bytes.fromhex("00ff55aa")
    tools("tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", "primary.ctx", cwd=work)
    tools("tpm2_create", "-C", "primary.ctx", "-G", "ecc256:ecdsa-sha256", "-u", "key.pub", "-r", "key.priv", cwd=work)
    tools("tpm2_load", "-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx", cwd=work)
    tools("tpm2_certify", "-c", "key.ctx", "-C", "ak.ctx", "-g", "sha256", "-o", "attest.out", "-s", "sig.out",
          "-f", "tss", cwd=work)
    ak = Public.parse(tpmt(work / "ak.pub"))
    key = Public.parse(tpmt(work / "key.pub"))
    evidence = TpmCertify((work / "attest.out").read_bytes(), (work / "sig.out").read_bytes(), key.raw)
    assert check_certify(evidence, ak, nonce, key.public_key()).name == key.name
    attest = bytearray(evidence.attest)
    attest[-5] ^= 1  # inside the certified name
    with pytest.raises(AttestError, match="signature does not verify"):
        check_certify(TpmCertify(bytes(attest), evidence.signature, evidence.public), ak, nonce, key.public_key())
    with pytest.raises(AttestError, match="not the nonce"):
        check_certify(evidence, ak, os.urandom(32), key.public_key())
