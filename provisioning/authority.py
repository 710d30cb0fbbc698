"""Issuing certificates: roots, intermediates, device, server and code-signing certificates.

Policy is data (`ChainPolicy`); this module is the builder. The station uses it to sign, the lab and
the tests use it to make test beds. Every profile sets SKI/AKI so chains build unambiguously.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning import der
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
class Issued:
    """A certificate just signed, with what the ledger records about it (RFC 5280 fields), so that no
    one parses it back to learn what its issuer already knew. Times are Unix seconds."""

    der: bytes
    serial: int
    subject: str        # RFC 4514, as `certs.subject_of` writes it
    not_before: int
    not_after: int

    @classmethod
    def of(cls, cert: x509.Certificate) -> Issued:
        """The facts of a certificate made another way (`CertificateBuilder`), read from it."""
        return cls(cert.public_bytes(serialization.Encoding.DER), cert.serial_number,
                   cert.subject.rfc4514_string() or "(empty subject)", int(cert.not_valid_before_utc.timestamp()),
                   int(cert.not_valid_after_utc.timestamp()))


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
                serial: int | None = None, extensions: Sequence[x509.ExtensionType] = ()) -> x509.Certificate:
    """Device certificate: CN = device id, CA:false, digitalSignature, clientAuth, SPIFFE ID first;
    `extensions` (non-critical) such as the certificate policies of a TPM-attested key.
    (`DeviceTemplate` writes the same certificate, without `extensions`, for a station's many devices.)"""
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(trust_domain, device_id))]
    sans += [s for s in extra_sans if s != sans[0]]
    return build(name(device_id), public_key, issuer, issuer.key, ca=False, lifetime=lifetime,
                 not_before=not_before, usage=_usage(digital_signature=True),
                 eku=[ExtendedKeyUsageOID.CLIENT_AUTH], sans=sans, crl_url=crl_url, serial=serial,
                 extensions=extensions)


class DeviceTemplate:
    """`device_cert` for one issuer, trust domain and lifetime, made from fixed DER and one signature.

    What every device certificate of an issuer shares (issuer name, signature algorithm, the
    BasicConstraints, AuthorityKeyIdentifier, KeyUsage and ExtendedKeyUsage extensions) is encoded
    once, here; `sign` fills in serial, validity, CN, key, SubjectKeyIdentifier and the SPIFFE ID and
    signs with the issuer's key (`key.sign(tbs, ECDSA(SHA-256))`, which a hardware key handle offers
    too). For the station that is about a fifth of what `CertificateBuilder` costs (der.py).

    Only an EC issuer key signing with ECDSA-SHA256 is templated; `for_issuer` returns None for any
    other, and the caller uses `device_cert`. A template checks itself when it is made: the
    to-be-signed bytes it writes for a sample device must equal, byte for byte, those `device_cert`
    writes for the same serial, times and key; ValueError otherwise.
    """

    _ECDSA_SHA256 = der.tlv(der.SEQUENCE, bytes.fromhex("06082a8648ce3d040302"))  # 1.2.840.10045.4.3.2
    _VERSION_3 = bytes.fromhex("a003020102")

    def __init__(self, issuer: Issuer, trust_domain: str, lifetime: dt.timedelta = dt.timedelta(days=365)) -> None:
        self.issuer = issuer
        self.trust_domain = trust_domain
        self.lifetime = int(lifetime.total_seconds())
        issuer_spki = issuer.cert.public_key().public_bytes(serialization.Encoding.DER,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self._head = self._VERSION_3  # then the serial
        self._issuer = self._ECDSA_SHA256 + issuer.cert.subject.public_bytes()
        bc = x509.BasicConstraints(ca=False, path_length=None)
        aki = hashlib.sha1(der.subject_key_bits(issuer_spki)).digest()  # noqa: S324 - RFC 5280 4.2.1.2 key id
        # the extensions in CertificateBuilder's order (`build`): SKI (per device), these four, SAN
        self._fixed = (_extension(bc.oid, True, der.tlv(der.SEQUENCE, b""))
                       + _extension(x509.AuthorityKeyIdentifier.oid, False, der.tlv(der.SEQUENCE, der.tlv(0x80, aki)))
                       + _extension(x509.KeyUsage.oid, True, der.tlv(der.BIT_STRING, b"\x07\x80"))  # digitalSignature
                       + _extension(x509.ExtendedKeyUsage.oid, False, der.tlv(der.SEQUENCE, der.tlv(
                           der.OID, bytes.fromhex("2b06010505070302")))))  # id-kp-clientAuth
        self._algorithm = ec.ECDSA(hashes.SHA256())
        self._check()

    @classmethod
    def for_issuer(cls, issuer: Issuer, trust_domain: str,
                   lifetime: dt.timedelta = dt.timedelta(days=365)) -> DeviceTemplate | None:
        """A template for `issuer`, or None when its key is not one a template signs for (not EC)."""
        if not isinstance(issuer.key, ec.EllipticCurvePrivateKey) or not isinstance(
                issuer.cert.signature_hash_algorithm, hashes.SHA256):
            return None
        return cls(issuer, trust_domain, lifetime)

    def tbs(self, spki: bytes, device_id: str, serial: int, not_before: int) -> bytes:
        """The TBSCertificate (RFC 5280 4.1) for a device key given as DER SubjectPublicKeyInfo;
        ValueError for a CN outside 1..64 characters (RFC 5280 ub-common-name, as `x509.NameAttribute`)."""
        cn = device_id.encode()
        if not 1 <= len(cn) <= 64:
            raise ValueError(f"device id {device_id[:80]!r}: a certificate CN holds 1 to 64 bytes of UTF-8, "
                             f"got {len(cn)}")
        ski = hashlib.sha1(der.subject_key_bits(spki)).digest()  # noqa: S324 - RFC 5280 4.2.1.2 key id
        subject = der.tlv(der.SEQUENCE, der.tlv(der.SET, der.tlv(der.SEQUENCE, _CN_OID + der.tlv(der.UTF8_STRING, cn))))
        uri = spiffe_id(self.trust_domain, device_id).encode()
        san = der.tlv(der.SEQUENCE, _SAN_OID + der.tlv(der.OCTET_STRING, der.tlv(der.SEQUENCE, der.tlv(0x86, uri))))
        validity = der.tlv(der.SEQUENCE, der.time(not_before) + der.time(not_before + self.lifetime))
        return der.tlv(der.SEQUENCE, self._head + der.integer(serial) + self._issuer + validity + subject + spki
                       + der.tlv(0xA3, der.tlv(der.SEQUENCE, _SKI_PREFIX + ski + self._fixed + san)))

    def sign(self, public_key: Any, device_id: str, *, spki: bytes | None = None) -> x509.Certificate:
        """What `device_cert(issuer, public_key, device_id, trust_domain, lifetime=...)` makes (valid from
        a minute ago); `spki`, the key's DER SubjectPublicKeyInfo, saves encoding it again."""
        return x509.load_der_x509_certificate(self.issue(public_key, device_id, spki=spki).der)

    def issue(self, public_key: Any, device_id: str, *, spki: bytes | None = None,
              now: int | None = None) -> Issued:
        """`sign`, returned as DER with its facts (serial, subject, validity), never parsed back.
        `_check` compares these facts with the parsed certificate's when the template is made."""
        if spki is None:
            spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        start = (int(dt.datetime.now(dt.UTC).timestamp()) if now is None else now) - 60
        serial = new_serial()
        tbs = self.tbs(spki, device_id, serial, start)
        signature = self.issuer.key.sign(tbs, self._algorithm)
        # a device id (identity.check_device_id) is written by RFC 4514 as it is; anything else is escaped
        subject = f"CN={device_id}" if _PLAIN_RDN.issuperset(device_id) else name(device_id).rfc4514_string()
        return Issued(der.tlv(der.SEQUENCE, tbs + self._ECDSA_SHA256 + der.tlv(der.BIT_STRING, b"\x00" + signature)),
                      serial, subject, start, start + self.lifetime)

    def _check(self) -> None:
        sample = ec.generate_private_key(ec.SECP256R1()).public_key()
        start = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        reference = device_cert(self.issuer, sample, "template-check", self.trust_domain,
                                lifetime=dt.timedelta(seconds=self.lifetime), not_before=start, serial=(1 << 158) | 5)
        spki = sample.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        mine = self.tbs(spki, "template-check", (1 << 158) | 5, int(start.timestamp()))
        if mine != reference.tbs_certificate_bytes:
            raise ValueError(f"device certificate template for {self.issuer.cert.subject.rfc4514_string()} does not "
                             "encode what CertificateBuilder does; refusing to sign with it")
        issued = self.issue(sample, "template-check", spki=spki)
        if dataclasses.replace(issued, der=b"") != dataclasses.replace(Issued.of(x509.load_der_x509_certificate(
                issued.der)), der=b""):
            raise ValueError(f"device certificate template for {self.issuer.cert.subject.rfc4514_string()}: the "
                             "serial, subject or validity it reports are not those of the certificate it signs")


def _extension(oid: x509.ObjectIdentifier, critical: bool, value: bytes) -> bytes:
    """Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE (omitted when false), extnValue }."""
    return der.tlv(der.SEQUENCE, der.tlv(der.OID, _oid_bytes(oid)) + (b"\x01\x01\xff" if critical else b"")
                   + der.tlv(der.OCTET_STRING, value))


def _oid_bytes(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return bytes(out)


_CN_OID = der.tlv(der.OID, bytes.fromhex("550403"))  # 2.5.4.3
# characters RFC 4514 never escapes in an attribute value (at its start and end included)
_PLAIN_RDN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_SAN_OID = der.tlv(der.OID, _oid_bytes(x509.SubjectAlternativeName.oid))
_SKI_PREFIX = _extension(x509.SubjectKeyIdentifier.oid, False, der.tlv(der.OCTET_STRING, bytes(20)))[:-20]


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
