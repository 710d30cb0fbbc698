"""The TPM's side of attested enrollment (tpm2-pytss): the EK and its certificate, an attestation key,
TPM2_ActivateCredential and TPM2_Certify. Hands out TPM structures as bytes, never key material.

- EK certificate: the maker's certificate in NV at the TCG EK Credential Profile indices (RSA 2048
  0x01c00002; ECC P-256 0x01c0000a; ECC P-384 0x01c00016). The EK itself is the persistent key at the
  profile's handle (0x81010001, 0x81010002, 0x81010016) when provisioned there, else it is derived again
  from the endorsement seed with the profile's template (tpm2-pytss `create_ek_template`).
- AK: a primary ECC P-256 restricted signing key (ECDSA-SHA256) in the endorsement hierarchy, made for
  one enrollment and flushed after it; fixedTPM, fixedParent and sensitiveDataOrigin, so the station can
  tell it never left this TPM.
- ActivateCredential needs the EK's authorisation: a key with userWithAuth takes the (empty) password;
  the low-range templates (userWithAuth clear) take a policy session satisfying PolicySecret(endorsement).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hal import KeyStoreError, storage
from hal.keys.tpm import TpmKeyStore

# (kind, NV index of the EK certificate, persistent handle of the EK, tpm2-pytss template name)
EK_PROFILES = (("rsa", 0x01C00002, 0x81010001, "EK-RSA2048"),
               ("ecc", 0x01C0000A, 0x81010002, "EK-ECC256"),
               ("ecc", 0x01C00016, 0x81010016, "EK-HIGH-ECC384"))
EK_CHOICES = ("auto", "rsa", "ecc")


@dataclass(frozen=True)
class Endorsement:
    """The EK certificate (DER, from NV) and the EK's TPMT_PUBLIC, as the station receives them."""

    certificate: bytes
    public: bytes
    nv_index: int


@dataclass(frozen=True)
class Certified:
    """TPM2_Certify's output: TPMS_ATTEST, TPMT_SIGNATURE by the AK, and the key's TPMT_PUBLIC."""

    attest: bytes
    signature: bytes
    public: bytes


class TpmAttester:
    """One attested enrollment's TPM session (`with TpmAttester(store) as tpm:`): the EK, an AK, and
    the two TPM operations on them. `store` is the device's TPM key store (TCTI and key blobs)."""

    def __init__(self, store: TpmKeyStore, ek: str = "auto") -> None:
        if ek not in EK_CHOICES:
            raise KeyStoreError(f"[enroll] ek {ek!r}: expected one of {', '.join(EK_CHOICES)}")
        self.store = store
        self.choice = ek
        self._ectx: Any = None
        self._ek: Any = None
        self._ek_public: Any = None
        self._ak: Any = None
        self._flush: list[Any] = []
        self.endorsement: Endorsement | None = None
        self.ak_public: bytes = b""

    def __enter__(self) -> TpmAttester:
        self._context = self.store._esapi()
        self._ectx = self._context.__enter__()
        try:
            self.endorsement = self._load_ek()
            self.ak_public = self._create_ak()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        for handle in self._flush:
            # best effort: the resource manager flushes a closed connection's objects anyway
            with contextlib.suppress(TSS2_Exception):
                self._ectx.flush_context(handle)
        self._flush.clear()
        self._context.__exit__(None, None, None)

    # -- EK --------------------------------------------------------------------------------------------
    def _nv_indices(self) -> set[int]:
        """The NV indices defined in the EK certificate range (asking first keeps the TSS from logging an
        error for every absent one)."""
        from tpm2_pytss import TPM2_CAP

        found: set[int] = set()
        more, start = True, 0x01C00000
        while more:
            more, data = self._ectx.get_capability(TPM2_CAP.HANDLES, start, 64)
            handles = [int(h) for h in data.data.handles]
            found.update(h for h in handles if h < 0x01C10000)
            if not handles or handles[-1] >= 0x01C10000:
                break
            start = handles[-1] + 1
        return found

    def _nv_read(self, index: int) -> bytes | None:
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.utils import NoSuchIndex, NVReadEK

        try:
            return bytes(NVReadEK(self._ectx)(index))
        except NoSuchIndex:
            return None
        except TSS2_Exception as exc:
            raise KeyStoreError(f"TPM at {self.store.tcti!r}: cannot read the EK certificate at NV index "
                                f"0x{index:08x}: {exc}") from exc

    def _load_ek(self) -> Endorsement:
        from tpm2_pytss import ESYS_TR, TPM2B_SENSITIVE_CREATE
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        tried = []
        defined = self._nv_indices()
        for kind, index, handle, template in EK_PROFILES:
            if self.choice not in ("auto", kind):
                continue
            tried.append(f"0x{index:08x}")
            cert = self._nv_read(index) if index in defined else None
            if not cert:
                continue
            cert = _der_only(cert)
            try:
                ek = self._ectx.tr_from_tpmpublic(handle)
            except TSS2_Exception:
                try:
                    _, public = create_ek_template(template, NVReadEK(self._ectx))
                    ek, *_ = self._ectx.create_primary(TPM2B_SENSITIVE_CREATE(), public, ESYS_TR.ENDORSEMENT)
                    self._flush.append(ek)
                except (TSS2_Exception, ValueError) as exc:
                    raise KeyStoreError(f"TPM at {self.store.tcti!r}: cannot make the EK for the certificate at "
                                        f"0x{index:08x}: {exc}") from exc
            public, _, _ = self._ectx.read_public(ek)
            self._ek, self._ek_public = ek, public.publicArea
            return Endorsement(cert, public.publicArea.marshal(), index)
        raise KeyStoreError(f"TPM at {self.store.tcti!r} holds no EK certificate (NV indices {', '.join(tried)} "
                            "are empty): attested enrollment needs the maker's EK certificate in the TPM; enroll "
                            "with a one-time password instead ([enroll] method = \"otp\")")

    # -- AK --------------------------------------------------------------------------------------------
    def _create_ak(self) -> bytes:
        from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMA_OBJECT

        attributes = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
                      | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
        template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attributes)
        ak, public, *_ = self._ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
        self._flush.append(ak)
        self._ak = ak
        return bytes(public.publicArea.marshal())

    # -- the two operations ------------------------------------------------------------------------------
    def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential: the secret the station sealed to this EK for this AK. KeyStoreError
        when the TPM refuses (the credential was made for another TPM or another AK)."""
        from tpm2_pytss import TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPMA_OBJECT
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        ectx = self._ectx
        session = None
        try:
            if self._ek_public.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
                from tpm2_pytss import ESYS_TR

                ek_auth = ESYS_TR.PASSWORD
            else:
                session = ek_auth = self._endorsement_policy()
            secret = ectx.activate_credential(self._ak, self._ek, TPM2B_ID_OBJECT(credential=credential_blob),
                                              TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret), session2=ek_auth)
        except TSS2_Exception as exc:
            raise KeyStoreError(f"the TPM could not activate the station's credential ({exc}): it was not made "
                                "for this TPM's EK and this AK") from exc
        finally:
            if session is not None:
                ectx.flush_context(session)
        return bytes(secret)

    def _endorsement_policy(self) -> Any:
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPMT_SYM_DEF

        session = self._ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                                                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), self._ek_public.nameAlg)
        self._ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, expiration=0)
        return session

    def certify(self, label: str, nonce: bytes) -> Certified:
        """TPM2_Certify of the device key `label` by the AK over `nonce`."""
        from tpm2_pytss import TPM2_ALG, TPMT_SIG_SCHEME
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        blob = self.store._blob(label)
        try:
            key = blob.load(self._ectx)
        except Exception as exc:  # TSS2_Exception: wrong TPM, cleared TPM, bad parent
            raise KeyStoreError(f"{self.store.path(label)}: the TPM refused to load this key ({exc})") from exc
        try:
            public, _, _ = self._ectx.read_public(key)
            attest, signature = self._ectx.certify(key, self._ak, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
        except TSS2_Exception as exc:
            raise KeyStoreError(f"TPM2_Certify of {self.store.path(label)} failed: {exc}") from exc
        finally:
            self._ectx.flush_context(key)
        return Certified(bytes(attest.marshal())[2:], bytes(signature.marshal()), bytes(public.publicArea.marshal()))


def _der_only(data: bytes) -> bytes:
    """NV areas are often larger than the certificate: keep the one DER SEQUENCE at the start."""
    if len(data) >= 4 and data[0] == 0x30 and data[1] == 0x82:
        return data[:4 + int.from_bytes(data[2:4], "big")]
    return data


@contextmanager
def attester(store: Any, ek: str = "auto") -> Iterator[TpmAttester]:
    """`TpmAttester` for a key store, or KeyStoreError saying why a non-TPM store cannot attest."""
    if not isinstance(store, TpmKeyStore):
        raise KeyStoreError(f"attested enrollment needs the device key in the TPM ([keys] uri = \"tpm:\"); the "
                            f"device key is in the {getattr(store, 'backend', type(store).__name__)} key store, "
                            "which no TPM can certify")
    storage.ensure_dir(store.directory)
    with TpmAttester(store, ek) as tpm:
        yield tpm
