"""TPM2_MakeCredential in software (TPM 2.0 Library Part 1 §24 "Credential Protection", Part 3 §12.6).

A fresh secret is sealed to one TPM's endorsement key (EK) and bound to the name of an attestation
key (AK): the TPM's TPM2_ActivateCredential gives the secret back only when the EK is its own and an
object with that name is loaded in it. Steps:

1. seed: RSA EK: random bytes of the EK nameAlg's digest size, encrypted with RSA-OAEP (nameAlg, label
   "IDENTITY\\0"); ECC EK: ECDH with an ephemeral key on the EK's curve,
   seed = KDFe(nameAlg, Z, "IDENTITY\\0", ephemeral.x, EK.x) (Part 1 §11.4.10.3); the encrypted secret is
   the ephemeral point (TPMS_ECC_POINT).
2. symKey = KDFa(nameAlg, seed, "STORAGE", AK name, "", EK symmetric key bits); encIdentity =
   CFB(symKey, IV 0, TPM2B_DIGEST(secret)).
3. HMACkey = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits); outerHMAC = HMAC(HMACkey,
   encIdentity || AK name); credentialBlob = TPM2B_DIGEST(outerHMAC) || encIdentity.

KDFa is SP 800-108 counter mode with HMAC (32-bit counter first, label, 0x00, context, 32-bit length),
which is `cryptography`'s KBKDFHMAC; KDFe is SP 800-56A's concatenation KDF (ConcatKDFHash).
tpm2-tools writes the output as one file: 0xBADCC0DE, version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from provisioning.attest import AttestError
from provisioning.attest.tpm2 import ALG_AES, ALG_CFB, DECRYPT, RESTRICTED, Public, Reader, hash_of, tpm2b

try:  # cryptography 47+ keeps CFB among the "decrepit" modes; the TPM specification still uses it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment,no-redef]

IDENTITY = b"IDENTITY\x00"
TOOLS_MAGIC, TOOLS_VERSION = 0xBADCC0DE, 1
SECRET_SIZE = 32


def kdfa(algorithm: type[hashes.HashAlgorithm], key: bytes, label: bytes, context_u: bytes, context_v: bytes,
         bits: int) -> bytes:
    """KDFa (Part 1 §11.4.10.2): `label` without its terminating zero (KBKDF adds the 0x00 separator)."""
    return KBKDFHMAC(algorithm=algorithm(), mode=Mode.CounterMode, length=bits // 8, rlen=4, llen=4,
                     location=CounterLocation.BeforeFixed, label=label, context=context_u + context_v,
                     fixed=None).derive(key)


def kdfe(algorithm: type[hashes.HashAlgorithm], z: bytes, use: bytes, party_u: bytes, party_v: bytes,
         bits: int) -> bytes:
    """KDFe (Part 1 §11.4.10.3): H(counter || Z || use || partyUInfo || partyVInfo), `use` with its zero."""
    return ConcatKDFHash(algorithm=algorithm(), length=bits // 8, otherinfo=use + party_u + party_v).derive(z)


@dataclass(frozen=True)
class Credential:
    """MakeCredential's output: `id_object` and `encrypted_secret` are the contents of TPM2B_ID_OBJECT
    and TPM2B_ENCRYPTED_SECRET (without their size fields); `secret` is what ActivateCredential returns."""

    id_object: bytes
    encrypted_secret: bytes
    secret: bytes

    def tools_file(self) -> bytes:
        """The file `tpm2_makecredential -o` writes and `tpm2_activatecredential -i` reads."""
        return struct.pack(">II", TOOLS_MAGIC, TOOLS_VERSION) + tpm2b(self.id_object) + tpm2b(self.encrypted_secret)


def read_tools_file(data: bytes) -> tuple[bytes, bytes]:
    """(id_object, encrypted_secret) from a tpm2-tools credential file; AttestError if it is not one."""
    r = Reader(data, "tpm2-tools credential file")
    magic, version = r.u32("magic"), r.u32("version")
    if (magic, version) != (TOOLS_MAGIC, TOOLS_VERSION):
        raise AttestError(f"tpm2-tools credential file: header 0x{magic:08x} version {version}, expected "
                          f"0x{TOOLS_MAGIC:08x} version {TOOLS_VERSION}")
    id_object, secret = r.tpm2b("TPM2B_ID_OBJECT"), r.tpm2b("TPM2B_ENCRYPTED_SECRET")
    r.end()
    return id_object, secret


def _seed(ek: Public) -> tuple[bytes, bytes]:
    _, algorithm = hash_of(ek.name_alg, "EK nameAlg")
    size = algorithm().digest_size
    key = ek.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        seed = os.urandom(size)
        return seed, key.encrypt(seed, padding.OAEP(padding.MGF1(algorithm()), algorithm(), IDENTITY))
    ephemeral = ec.generate_private_key(key.curve)
    length = (key.curve.key_size + 7) // 8
    point = ephemeral.public_key().public_numbers()
    ex, ey = point.x.to_bytes(length, "big"), point.y.to_bytes(length, "big")
    z = ephemeral.exchange(ec.ECDH(), key)
    seed = kdfe(algorithm, z, IDENTITY, ex, key.public_numbers().x.to_bytes(length, "big"), size * 8)
    return seed, tpm2b(ex) + tpm2b(ey)


def make_credential(ek: Public, ak_name: bytes, secret: bytes | None = None) -> Credential:
    """Seal `secret` (a fresh 32 random bytes when None) to the TPM holding `ek`, for the object named
    `ak_name`. AttestError when the EK is not a restricted decryption key with AES-CFB protection."""
    if not ek.has(RESTRICTED, DECRYPT):
        raise AttestError(f"EK public area: a credential needs a restricted decryption key; it lacks "
                          f"{', '.join(ek.missing(RESTRICTED, DECRYPT))}")
    sym_alg, sym_bits, sym_mode = ek.symmetric
    if (sym_alg, sym_mode) != (ALG_AES, ALG_CFB) or sym_bits not in (128, 192, 256):
        raise AttestError(f"EK public area: symmetric 0x{sym_alg:04x}/{sym_bits}/0x{sym_mode:04x} is not AES-CFB "
                          "(what the TCG EK templates use)")
    secret = os.urandom(SECRET_SIZE) if secret is None else secret
    _, algorithm = hash_of(ek.name_alg, "EK nameAlg")
    seed, encrypted_secret = _seed(ek)
    sym_key = kdfa(algorithm, seed, b"STORAGE", ak_name, b"", sym_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(b"\x00" * 16)).encryptor()
    enc_identity = encryptor.update(tpm2b(secret)) + encryptor.finalize()
    hmac_key = kdfa(algorithm, seed, b"INTEGRITY", b"", b"", algorithm().digest_size * 8)
    mac = hmac.HMAC(hmac_key, algorithm())
    mac.update(enc_identity + ak_name)
    return Credential(tpm2b(mac.finalize()) + enc_identity, encrypted_secret, secret)
