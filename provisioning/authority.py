"""Issuing certificates: roots, intermediates, device, server and code-signing certificates.

Policy is data (`ChainPolicy`); this module is the builder. The station uses it to sign, the lab and
the tests use it to make test beds. Every profile sets SKI/AKI so chains build unambiguously.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.identity import spiffe_id


def new_serial() -> int:
    # RFC 5280 4.1.2.2: positive, at most 20 octets; 159 random bits keeps it positive and unique.
    return secrets.randbits(159) | 1


def name(cn: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


@dataclass(frozen=True)
class Issuer:
    """A CA that signs: its certificate and a private key (or a signer handle)."""

    cert: x509.Certificate
    key: Any


def _usage(digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False,
           key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
                         key_cert_sign=key_cert_sign, crl_sign=crl_sign, encipher_only=False,
                         decipher_only=False)


def build(subject: x509.Name, public_key: Any, issuer: Issuer | None, signing_key: Any, *,
          ca: bool, pathlen: int | None = None, not_before: dt.datetime | None = None,
          lifetime: dt.timedelta = dt.timedelta(days=365), serial: int | None = None,
          usage: x509.KeyUsage | None = None, eku: Sequence[x509.ObjectIdentifier] = (),
          sans: Sequence[x509.GeneralName] = (), bc_critical: bool = True, include_bc: bool = True,
          crl_url: str | None = None, extensions: Sequence[x509.ExtensionType] = ()) -> x509.Certificate:
    """One certificate. `issuer=None` makes it self-signed with `signing_key`.

    The knobs exist so tests can build certificates that break one rule at a time.
    """
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(public_key)
               .serial_number(serial or new_serial())
               .not_valid_before(start)
               .not_valid_after(start + lifetime)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if include_bc:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=pathlen if ca else None),
                                        critical=bc_critical)
    issuer_public = issuer.cert.public_key() if issuer else public_key
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public),  # type: ignore[arg-type]
                                    critical=False)
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if crl_url:
        point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def root_ca(key: Any, cn: str = "Tether Root CA", lifetime: dt.timedelta = dt.timedelta(days=3650),
            organization: str | None = "Tether", pathlen: int = 1) -> x509.Certificate:
    """Self-signed root: CA:true critical, pathlen 1 (0 when it signs devices itself), keyCertSign|cRLSign."""
    return build(name(cn, organization), key.public_key(), None, key, ca=True, pathlen=pathlen, lifetime=lifetime,
                 usage=_usage(key_cert_sign=True, crl_sign=True))


def intermediate_ca(parent: Issuer, public_key: Any, cn: str = "Tether Issuing CA",
                    lifetime: dt.timedelta = dt.timedelta(days=1825),
                    organization: str | None = "Tether") -> x509.Certificate:
    """Issuing CA under `parent`: CA:true critical, pathlen 0."""
    return build(name(cn, organization), public_key, parent, parent.key, ca=True, pathlen=0,
                 lifetime=lifetime, usage=_usage(digital_signature=True, key_cert_sign=True, crl_sign=True))


def device_cert(issuer: Issuer, public_key: Any, device_id: str, trust_domain: str, *,
                lifetime: dt.timedelta = dt.timedelta(days=365), extra_sans: Sequence[x509.GeneralName] = (),
                not_before: dt.datetime | None = None, crl_url: str | None = None,
                extensions: Sequence[x509.ExtensionType] = ()) -> x509.Certificate:
    """Device certificate: CN = device id, CA:false, digitalSignature, clientAuth, SPIFFE ID first;
    `extensions` (non-critical) such as the certificate policies of a TPM-attested key."""
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(trust_domain, device_id))]
    sans += [s for s in extra_sans if s != sans[0]]
    return build(name(device_id), public_key, issuer, issuer.key, ca=False, lifetime=lifetime,
                 not_before=not_before, usage=_usage(digital_signature=True),
                 eku=[ExtendedKeyUsageOID.CLIENT_AUTH], sans=sans, crl_url=crl_url, extensions=extensions)


def server_cert(issuer: Issuer, public_key: Any, cn: str, dns: Sequence[str] = (), ips: Sequence[str] = (),
                *, lifetime: dt.timedelta = dt.timedelta(days=365),
                not_before: dt.datetime | None = None) -> x509.Certificate:
    """Broker / core / EST server certificate with DNS and IP SANs (thin-edge seed: CN and SANs)."""
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return build(name(cn), public_key, issuer, issuer.key, ca=False, lifetime=lifetime, not_before=not_before,
                 usage=_usage(digital_signature=True, key_encipherment=True),
                 eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans or [x509.DNSName(cn)])


def code_signing_cert(issuer: Issuer, public_key: Any, cn: str = "Tether Release Signing",
                      lifetime: dt.timedelta = dt.timedelta(days=1825)) -> x509.Certificate:
    return build(name(cn), public_key, issuer, issuer.key, ca=False, lifetime=lifetime,
                 usage=_usage(digital_signature=True), eku=[ExtendedKeyUsageOID.CODE_SIGNING])
