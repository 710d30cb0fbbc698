"""`ChainPolicy`: the identity rules, as data, applied by the device before it stores a chain and by
the station before it signs (DESIGN.md "Identity rules"; Cumulocity's device-certificate
requirements in seed 004: X.509 v3, issuers CA:true, pathlen, no ':' in the CN, the full chain
including the root, validity).

Every check collects all violations rather than stopping at the first, so one error message tells
the operator everything that is wrong with a chain.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from provisioning import PolicyError, Violation
from provisioning.certs import UNREADABLE_KEY, ReadCsr, common_name, issued_by, same_public_key, serial_of, subject_of
from provisioning.identity import parse_spiffe_id, spiffe_id

_UNREADABLE_KEY = UNREADABLE_KEY  # what `cryptography` raises for a key it cannot read


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def extension(cert: x509.Certificate | x509.CertificateSigningRequest, cls: type) -> x509.Extension | None:
    """The extension of type `cls`, or None when absent, duplicated or unparsable (the rules then report
    it as missing, naming the certificate)."""
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):  # duplicate or unparsable
        return None


@dataclass(frozen=True)
class ChainPolicy:
    """Rules for a device chain (leaf, intermediates, root) and for the CSRs that lead to one.

    trust_domain: when set, the leaf's first SAN URI must be this domain's SPIFFE ID for the device.
    anchors: when given, the chain's root must be one of these certificates (by public key and subject).
    min_rsa_bits: RSA keys below this size are refused; EC keys must be P-256.
    clock_skew: leeway when checking validity, for devices whose clock is slightly off.
    """

    trust_domain: str | None = None
    anchors: tuple[x509.Certificate, ...] = ()
    min_rsa_bits: int = 2048
    clock_skew: dt.timedelta = dt.timedelta(minutes=5)

    # -- keys ---------------------------------------------------------------------------------------
    def key_violations(self, key: object, subject: str, serial: str) -> list[Violation]:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name != "secp256r1":
                return [Violation(subject, serial, "key-type", f"EC curve {key.curve.name}, expected P-256")]
            return []
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < self.min_rsa_bits:
                return [Violation(subject, serial, "key-size",
                                  f"RSA {key.key_size} bits, at least {self.min_rsa_bits} required")]
            return []
        return [Violation(subject, serial, "key-type", f"{type(key).__name__}, expected EC P-256 or RSA")]

    # -- one certificate ----------------------------------------------------------------------------
    def certificate_violations(self, cert: x509.Certificate, now: dt.datetime) -> list[Violation]:
        s, n = subject_of(cert), serial_of(cert)
        out: list[Violation] = []
        if cert.version != x509.Version.v3:
            out.append(Violation(s, n, "x509-v3", f"version {cert.version.name}, X.509 v3 required"))
        if cert.not_valid_before_utc > now + self.clock_skew:
            out.append(Violation(s, n, "not-yet-valid",
                                 f"valid from {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}, now is "
                                 f"{now:%Y-%m-%dT%H:%M:%SZ} (check the device clock)"))
        if cert.not_valid_after_utc < now - self.clock_skew:
            out.append(Violation(s, n, "expired", f"expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"))
        try:
            key = cert.public_key()
        except _UNREADABLE_KEY as exc:
            return [*out, Violation(s, n, "key-type", f"unreadable public key: {exc}")]
        return out + self.key_violations(key, s, n)

    def issuer_violations(self, cert: x509.Certificate, below: int) -> list[Violation]:
        """Rules for a CA certificate with `below` CA certificates between it and the leaf."""
        s, n = subject_of(cert), serial_of(cert)
        out: list[Violation] = []
        bc = extension(cert, x509.BasicConstraints)
        if bc is None or not bc.value.ca:
            out.append(Violation(s, n, "issuer-ca", "issues certificates but lacks BasicConstraints CA:true"))
        else:
            if not bc.critical:
                out.append(Violation(s, n, "issuer-ca", "BasicConstraints must be marked critical"))
            if bc.value.path_length is not None and below > bc.value.path_length:
                out.append(Violation(s, n, "pathlen", f"pathlen {bc.value.path_length} allows "
                                     f"{bc.value.path_length} CA(s) below it, the chain has {below}"))
        ku = extension(cert, x509.KeyUsage)
        if ku is not None and not ku.value.key_cert_sign:
            out.append(Violation(s, n, "key-usage", "KeyUsage lacks keyCertSign"))
        return out

    def leaf_violations(self, cert: x509.Certificate, device_id: str | None) -> list[Violation]:
        """Device-certificate rules: CA:false, digitalSignature, clientAuth, CN, SPIFFE SAN."""
        s, n = subject_of(cert), serial_of(cert)
        out: list[Violation] = []
        bc = extension(cert, x509.BasicConstraints)
        if bc is not None and bc.value.ca:
            out.append(Violation(s, n, "leaf-ca", "a device certificate must be CA:false"))
        ku = extension(cert, x509.KeyUsage)
        if ku is not None and not ku.value.digital_signature:
            out.append(Violation(s, n, "key-usage", "KeyUsage lacks digitalSignature"))
        eku = extension(cert, x509.ExtendedKeyUsage)
        if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku.value:
            out.append(Violation(s, n, "client-auth", "ExtendedKeyUsage lacks clientAuth (TLS client)"))
        out += self.name_violations(cert.subject, extension(cert, x509.SubjectAlternativeName), device_id, s, n)
        return out

    def name_violations(self, subject: x509.Name, san: x509.Extension | None, device_id: str | None,
                        s: str, n: str) -> list[Violation]:
        """CN and SAN rules shared by certificates and CSRs."""
        out: list[Violation] = []
        cn = common_name(subject)
        if not cn:
            out.append(Violation(s, n, "cn", "subject has no CN (the CN is the device id and MQTT client id)"))
        elif ":" in cn:
            out.append(Violation(s, n, "cn", f"CN {cn!r} contains ':', which Cumulocity forbids"))
        elif device_id is not None and cn != device_id:
            out.append(Violation(s, n, "cn", f"CN {cn!r} does not match the device id {device_id!r}"))
        if self.trust_domain is not None and cn:
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier) if san else []
            expected = spiffe_id(self.trust_domain, device_id or cn)
            if not uris:
                out.append(Violation(s, n, "spiffe-id", f"no SAN URI, expected {expected!r}"))
            elif uris[0] != expected:
                got = parse_spiffe_id(uris[0])
                why = "another trust domain" if got and got[1] == (device_id or cn) else "another identity"
                out.append(Violation(s, n, "spiffe-id", f"first SAN URI {uris[0]!r} names {why}, "
                                     f"expected {expected!r}"))
        return out

    # -- chains -------------------------------------------------------------------------------------
    def chain_violations(self, chain: Sequence[x509.Certificate], *, device_id: str | None = None,
                         device_key: object | None = None, now: dt.datetime | None = None) -> list[Violation]:
        """Every rule the chain (leaf, intermediates..., root) breaks; empty when it is acceptable."""
        if not chain:
            return [Violation("(none)", "-", "chain-empty", "no certificate given")]
        now = now or _now()
        out: list[Violation] = []
        leaf = chain[0]
        out += self.certificate_violations(leaf, now)
        out += self.leaf_violations(leaf, device_id)
        try:
            leaf_key = leaf.public_key()
        except _UNREADABLE_KEY:  # reported as key-type by certificate_violations above
            leaf_key = None
        if device_key is not None and leaf_key is not None and not same_public_key(leaf_key, device_key):
            out.append(Violation(subject_of(leaf), serial_of(leaf), "key-mismatch",
                                 "the certificate's public key is not the device's key (issued for "
                                 "another key, or the key was replaced)"))
        for i, cert in enumerate(chain[1:], 1):
            out += self.certificate_violations(cert, now)
            out += self.issuer_violations(cert, below=i - 1)
        for child, parent in itertools.pairwise(chain):
            out += self.link_violations(child, parent)
        root = chain[-1]
        if len(chain) == 1 or root.issuer != root.subject:
            out.append(Violation(subject_of(root), serial_of(root), "chain-root",
                                 "the chain must end with its self-signed root CA (leaf, intermediates, "
                                 "root), as Cumulocity requires"))
        elif not self.signed_by(root, root):
            out.append(Violation(subject_of(root), serial_of(root), "signature", "root self-signature invalid"))
        elif self.anchors and not any(a.subject == root.subject and same_public_key(a.public_key(),
                                      root.public_key()) for a in self.anchors):
            out.append(Violation(subject_of(root), serial_of(root), "untrusted-root",
                                 "root is not one of the configured trust anchors"))
        return out

    @staticmethod
    def signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
        return issued_by(child, parent)

    def link_violations(self, child: x509.Certificate, parent: x509.Certificate) -> list[Violation]:
        s, n = subject_of(child), serial_of(child)
        if child.issuer != parent.subject:
            return [Violation(s, n, "chain-order", f"issuer {child.issuer.rfc4514_string()!r} is not the next "
                              f"certificate's subject {subject_of(parent)!r}; order must be leaf, "
                              "intermediates, root")]
        if not self.signed_by(child, parent):
            return [Violation(s, n, "signature", f"signature does not verify with {subject_of(parent)}'s key")]
        return []

    def check_chain(self, chain: Sequence[x509.Certificate], *, device_id: str | None = None,
                    device_key: object | None = None, now: dt.datetime | None = None) -> None:
        """Raise PolicyError listing every violation; return None when the chain is acceptable."""
        violations = self.chain_violations(chain, device_id=device_id, device_key=device_key, now=now)
        if violations:
            raise PolicyError(violations)

    # -- CSRs (station side) ------------------------------------------------------------------------
    def check_csr(self, csr: x509.CertificateSigningRequest | ReadCsr, device_id: str | None = None) -> None:
        """Proof of possession (the CSR's signature), key type, CN and SAN rules; raise PolicyError.

        `csr` may come read already (`certs.read_csr`, the station's request path): its subject and
        key are then decoded once for these rules and for the signer after them."""
        read = csr if isinstance(csr, ReadCsr) else ReadCsr.of(csr)
        n = "CSR"
        # the subject's RFC 4514 string names the CSR in a violation: written only when there is one
        out: list[Violation] = []
        try:
            signed = read.signature_valid()
        except _UNREADABLE_KEY:  # the key it carries cannot verify anything: reported as key-type below
            signed = False
        if not signed:
            out.append(Violation("", n, "proof-of-possession", "the CSR's signature does not verify with the "
                                 "key it carries (signed by another key, or altered)"))
        if read.key is None:
            out.append(Violation("", n, "key-type", f"unreadable public key: {read.key_error}"))
        else:
            out += self.key_violations(read.key, "", n)
        out += self.name_violations(read.subject, extension(read.csr, x509.SubjectAlternativeName), device_id, "", n)
        if out:
            s = read.subject.rfc4514_string() or "(empty subject)"
            raise PolicyError([v._replace(subject=s) for v in out],
                              what=f"CSR for {common_name(read.subject) or '(no CN)'}")
