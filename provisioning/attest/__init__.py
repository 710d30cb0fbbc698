"""TPM attestation for zero-touch enrollment (issue 27): the structures the station checks, with
`cryptography` only (the station never needs tpm2-pytss).

- `tpm2`: TPM 2.0 wire structures (TPM 2.0 Library Part 2): TPMT_PUBLIC and its name, TPMS_ATTEST,
  TPMT_SIGNATURE; parsing and the few marshalling helpers tests and the device need.
- `credential`: TPM2_MakeCredential in software (Part 1 §24: KDFa, KDFe, seed to the EK, CFB, HMAC),
  and tpm2-tools' file format for its output.
- `evidence`: the CSR's evidence attribute (draft-ietf-lamps-csr-attestation, statement
  `tcg-attest-tpm-certify`), built and read.
- `verify`: the checks themselves (EK chain to a maker's root, AK attributes, TPM2_Certify over the
  station's nonce for the CSR's key); every failure an `AttestError` naming what was wrong.
"""

from __future__ import annotations

from provisioning import ProvisioningError


class AttestError(ProvisioningError):
    """Attestation evidence that the station refuses; the message names the field and the reason."""
