"""Building the device's certificate signing request (PKCS#10) with a key-store signer."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from provisioning import ProvisioningError
from provisioning.identity import check_device_id, check_trust_domain, spiffe_id


def build_csr(signer: Any, device_id: str, trust_domain: str, *, dns: Sequence[str] = (),
              ips: Sequence[str] = (), organization: str | None = None) -> x509.CertificateSigningRequest:
    """A CSR with CN = device id and first SAN URI = the device's SPIFFE ID, signed by `signer`.

    `signer` is what `KeyStore.signer()` yields (a file key or a TPM-backed key): the signature is
    the proof of possession the station checks. Raises ProvisioningError for a bad id, domain or IP.
    """
    check_device_id(device_id, carried_by=())  # the station decides which ids it gives out
    check_trust_domain(trust_domain)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(trust_domain, device_id))]
    names += [x509.DNSName(d) for d in dns]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ProvisioningError(f"SAN IP {ip!r} is not an IP address") from None
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name(attrs))
               .add_extension(x509.SubjectAlternativeName(names), critical=False))
    return builder.sign(signer, hashes.SHA256())
