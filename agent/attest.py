"""First enrollment by TPM attestation (`[enroll] method = "tpm-attestation"`): no secret carried to the
device. The exchange is docs/station.md "Attested enrollment":

1. `attest/start`: the EK certificate (from the TPM's NV), the EK's and a fresh AK's public areas; the
   station answers a credential (TPM2_MakeCredential for this EK and AK) and a nonce.
2. The TPM activates the credential (only it can) and certifies the device key with the AK over the
   nonce; the CSR carries that certify (draft-ietf-lamps-csr-attestation evidence attribute).
3. `attest/simpleenroll` with HTTP Basic (device id, the recovered secret in hex) and the CSR.

A crash anywhere before the chain is stored costs nothing: the next attempt starts over with a new
challenge for the same key (the station drops the unanswered one; an EK stays bound to its device).
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from agent.config import Config
from agent.errors import AgentError
from agent.identity import KEY_LABEL, DeviceIdentity
from hal import KeyStoreError
from hal.keys.tpm_attest import attester
from provisioning import EnrollmentError

log = logging.getLogger("tether.enroll")

ATTEST_LABEL = "attest"
JSON_TYPE = "application/json"


def _decode(answer: bytes, url: str) -> dict[str, bytes]:
    try:
        doc = json.loads(answer)
        return {key: base64.b64decode(doc[key], validate=True)
                for key in ("credential_blob", "encrypted_secret", "nonce")}
    except (ValueError, KeyError, TypeError) as exc:
        raise EnrollmentError(f"{url}/attest/start: the answer is not a challenge ({exc})", retryable=False) from None


def enroll_attested(config: Config, identity: DeviceIdentity) -> dict[str, Any]:
    """Enroll with the TPM's attestation and store the chain; the same result dict as `enroll.enroll`.

    KeyStoreError (one line, what is missing) for a file key or a TPM without an EK certificate;
    EnrollmentError (with `retryable`) when the station refuses or cannot be reached.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from provisioning.attest.evidence import TpmCertify, build_csr
    from provisioning.certstore import chain_facts
    from provisioning.est.client import BasicAuth, EstClient

    if not config.est.url:
        raise AgentError(f"{config.sources[0] if config.sources else 'config'}: [est] url is not set "
                         "(https://station:8443)")
    backend = getattr(identity.keystore, "backend", "?")
    if backend != "tpm":
        raise KeyStoreError(f"[enroll] method = \"tpm-attestation\" needs the device key in the TPM ([keys] uri = "
                            f"\"tpm:\"); this device's key store is {backend!r}, which no TPM can certify")
    if identity.ensure_key():
        log.info("created device key in the TPM")
    device_id = identity.device_id
    with attester(identity.keystore, config.enroll.ek) as tpm:
        assert tpm.endorsement is not None
        request = json.dumps({"device_id": device_id,
                              "ek_certificate": base64.b64encode(tpm.endorsement.certificate).decode(),
                              "ek_public": base64.b64encode(tpm.endorsement.public).decode(),
                              "ak_public": base64.b64encode(tpm.ak_public).decode()}).encode()
        with EstClient(config.est.url, config.est.ca_file, config.est.timeout, label=ATTEST_LABEL) as client:
            challenge = _decode(client.post("start", request, JSON_TYPE), client.base_url)
        secret = tpm.activate(challenge["credential_blob"], challenge["encrypted_secret"])
        certified = tpm.certify(KEY_LABEL, challenge["nonce"])
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    with identity.keystore.signer(KEY_LABEL) as key:
        csr = build_csr(subject, key, TpmCertify(certified.attest, certified.signature, certified.public))
    with EstClient(config.est.url, config.est.ca_file, config.est.timeout, auth=BasicAuth(device_id, secret.hex()),
                   label=ATTEST_LABEL) as client:
        chain = client.simpleenroll(csr)
    identity.install_chain(chain)
    return {**chain_facts(chain), "csr_reused": False, "auth": "tpm-attestation"}
