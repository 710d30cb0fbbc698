"""Non-exportable keys in a TPM 2.0, kept as `TSS2 PRIVATE KEY` blobs (tpm2-pytss).

The blob's private part is wrapped by the TPM's storage root key: copied to another machine it is
useless. Signing happens inside the TPM; `ssl` uses the key through the tpm2-openssl provider, which
needs `OPENSSL_CONF` (the read-only `openssl-tpm2.cnf` shipped next to this module) and
`TPM2OPENSSL_TCTI` in the environment before `ssl` is first imported (see DESIGN.md "Keys"). Every
TPM call goes through a resource manager (`/dev/tpmrm0` or tpm2-abrmd): straight to the TPM its three
transient slots fill up.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hal import KeyStoreError, storage
from hal.keys import DEFAULT_ALGORITHM, TlsKey, check_label

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificateIssuerPrivateKeyTypes,
        PublicKeyTypes,
    )

DEFAULT_TCTI = "device:/dev/tpmrm0"
TPM_ALGORITHMS = ("ec-p256", "rsa-2048")

# The OpenSSL configuration that activates the tpm2 provider: a constant, so it ships read-only in the
# package. It was written into the keys directory, which the agent user owns, and root running `tether`
# then handed OpenSSL a file that user could swap for one loading any module (issue 22, item 2).
SHIPPED_OPENSSL_CONF = Path(__file__).with_name("openssl-tpm2.cnf")


def trusted_openssl_conf(path: Path) -> Path:
    """`path` with symlinks resolved, once only root or this process's user can change what it names.

    OpenSSL opens the file itself, later, and loads any module it names into this process: so the file
    and every directory above it must be owned by root or by us and writable by nobody else (a sticky
    directory such as /tmp counts as safe: others cannot replace what they do not own in it). Checking
    the bytes would not do: a FIFO or a swap between two opens serves the check one file and OpenSSL
    another. Raises KeyStoreError naming the first component that fails and why.
    """
    real = Path(os.path.realpath(path))
    me = os.geteuid()
    for part in (*reversed(real.parents), real):
        try:
            st = os.lstat(part)
        except OSError as exc:
            raise KeyStoreError(f"{path}: cannot check the OpenSSL configuration for TPM keys: {part}: "
                                f"{exc.strerror}; reinstall tether") from None
        is_file = part == real
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky_dir = not is_file and st.st_mode & stat.S_ISVTX
        if stat.S_ISLNK(st.st_mode):
            problem = "was replaced by a symlink while it was checked"
        elif is_file and not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif not is_file and not stat.S_ISDIR(st.st_mode):
            problem = "is not a directory"
        elif st.st_uid not in (0, me):
            problem = f"is owned by uid {st.st_uid}"
        elif writable and not sticky_dir:
            problem = f"can be written by {'other users' if st.st_mode & stat.S_IWOTH else 'its group'} " \
                      f"(mode {stat.S_IMODE(st.st_mode):04o})"
        else:
            continue
        raise KeyStoreError(f"{path}: refusing the OpenSSL configuration for TPM keys: {part} {problem}, so "
                            f"another user could make this process (uid {me}) load their code; install tether "
                            "where only root (or this user) can write")
    return real


PERSISTENT_RANGE = range(0x81000000, 0x82000000)  # TPM2_HT_PERSISTENT handles


def parse_handle(value: str | int | None) -> int | None:
    """A persistent handle from config (`"0x81000001"`); None when unset; KeyStoreError otherwise."""
    if value in (None, ""):
        return None
    try:
        handle = int(value, 16) if isinstance(value, str) else int(value)
    except ValueError:
        raise KeyStoreError(f"[keys] parent_handle {value!r} is not a hex TPM handle such as 0x81000001") from None
    if handle not in PERSISTENT_RANGE:
        raise KeyStoreError(f"[keys] parent_handle 0x{handle:08x} is not a persistent handle "
                            "(0x81000000..0x81ffffff)")
    return handle


class TpmKeyStore:
    """Keys in `<directory>/<label>.tss2.pem`, usable only with the TPM that created them.

    By default a key's parent is the owner hierarchy's primary storage key, derived again from the
    TPM's seed on every use. With `parent_handle` (for example 0x81000001, the handle the TCG
    provisioning guidance gives the SRK) the parent is a storage key made persistent at that handle,
    created on first use: loading a key then skips the primary derivation, and tpm2-openssl finds the
    parent through the same handle recorded in the blob.
    """

    backend = "tpm"

    def __init__(self, directory: str | os.PathLike[str], tcti: str | None = None,
                 parent_handle: str | int | None = None, **_: Any) -> None:
        self.directory = Path(directory)
        self.tcti = tcti or os.environ.get("TPM2OPENSSL_TCTI") or DEFAULT_TCTI
        self.parent_handle = parse_handle(parent_handle)

    def path(self, label: str) -> Path:
        return self.directory / f"{check_label(label)}.tss2.pem"

    @contextmanager
    def _esapi(self) -> Iterator[Any]:
        try:
            from tpm2_pytss import ESAPI
        except ImportError as exc:
            raise KeyStoreError(f"TPM key backend needs tpm2-pytss: {exc} (pip install 'tether[tpm]')") \
                from exc
        try:
            ectx = ESAPI(self.tcti)
        except Exception as exc:  # tpm2-pytss raises TSS2_Exception or plain Exception from the TCTI loader
            raise KeyStoreError(f"TPM at TCTI {self.tcti!r} is unreachable: {exc}; check [keys] tcti and "
                                "that a resource manager (/dev/tpmrm0 or tpm2-abrmd) is running") from exc
        try:
            yield ectx
        finally:
            ectx.close()

    def exists(self, label: str) -> bool:
        return self.path(label).is_file()

    def _persistent_parent(self, ectx: Any) -> int:
        """The persistent storage key at `parent_handle`, created (ECC P-256 SRK template) if absent."""
        from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.tsskey import _parent_ecc_template

        handle = self.parent_handle
        assert handle is not None
        try:
            ectx.tr_from_tpmpublic(handle)
            return handle
        except TSS2_Exception:
            pass  # not there yet: this is the first key under it
        try:
            primary, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=_parent_ecc_template),
                                              ESYS_TR.RH_OWNER)
            ectx.evict_control(ESYS_TR.RH_OWNER, primary, handle)
            ectx.flush_context(primary)
        except TSS2_Exception as exc:
            raise KeyStoreError(f"cannot make the storage key persistent at 0x{handle:08x}: {exc} (owner "
                                "authorization set, or the handle taken by another object?)") from exc
        return handle

    def create(self, label: str, algorithm: str = DEFAULT_ALGORITHM) -> None:
        from tpm2_pytss.tsskey import TSSPrivKey

        path = self.path(label)
        if path.exists():
            raise KeyStoreError(f"{path}: a key with label {label!r} already exists; delete it first")
        if algorithm not in TPM_ALGORITHMS:
            raise KeyStoreError(f"key algorithm {algorithm!r} is unsupported by the TPM backend: expected "
                                f"one of {', '.join(TPM_ALGORITHMS)}")
        with self._esapi() as ectx:
            parent = self._persistent_parent(ectx) if self.parent_handle else None
            options = {"parent": parent} if parent else {}
            key = (TSSPrivKey.create_ecc(ectx, **options) if algorithm == "ec-p256"
                   else TSSPrivKey.create_rsa(ectx, 2048, **options))
        storage.ensure_dir(self.directory)
        storage.atomic_write(path, key.to_pem(), storage.SECRET_MODE)

    def delete(self, label: str) -> None:
        storage.remove(self.path(label))

    def rename(self, label: str, new_label: str) -> None:
        src, dst = self.path(label), self.path(new_label)
        if not src.exists():
            raise KeyStoreError(f"{src}: no key with label {label!r} to promote")
        os.replace(src, dst)
        storage.fsync_dir(self.directory)

    def _blob(self, label: str) -> Any:
        from tpm2_pytss.tsskey import TSSPrivKey

        path = self.path(label)
        data = storage.read_bytes(path)
        if data is None:
            raise KeyStoreError(f"{path}: no key with label {label!r}; run `tether keygen --backend tpm`")
        try:
            return TSSPrivKey.from_pem(data)
        except Exception as exc:  # pyasn1 / ValueError variety from the blob parser
            raise KeyStoreError(f"{path}: not a TSS2 PRIVATE KEY blob: {exc}") from exc

    def public_key(self, label: str) -> PublicKeyTypes:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        return load_pem_public_key(self._blob(label).public.to_pem())

    @contextmanager
    def signer(self, label: str) -> Iterator[CertificateIssuerPrivateKeyTypes]:
        from tpm2_pytss.cryptography import tpm_ecc_private_key, tpm_rsa_private_key

        blob = self._blob(label)
        with self._esapi() as ectx:
            try:
                handle = blob.load(ectx)
            except Exception as exc:  # TSS2_Exception: wrong TPM, cleared TPM, bad parent
                raise KeyStoreError(f"{self.path(label)}: the TPM refused to load this key ({exc}); was it "
                                    "made by another TPM, or was the TPM cleared?") from exc
            try:
                from cryptography.hazmat.primitives.asymmetric import ec

                if isinstance(self.public_key(label), ec.EllipticCurvePublicKey):
                    yield tpm_ecc_private_key(ectx, handle)
                else:
                    yield tpm_rsa_private_key(ectx, handle)
            finally:
                ectx.flush_context(handle)

    def openssl_conf(self) -> Path:
        """The shipped OpenSSL configuration that activates the tpm2 provider, once it is trusted.

        Never a file in `directory`: that belongs to the agent user, and root runs this too.
        """
        return trusted_openssl_conf(SHIPPED_OPENSSL_CONF)

    def tls_key(self, label: str) -> TlsKey:
        path = self.path(label)
        if not path.is_file():
            raise KeyStoreError(f"{path}: no key with label {label!r}; run `tether keygen --backend tpm`")
        return TlsKey(keyfile=str(path), env=self.tls_env())

    def tls_env(self) -> dict[str, str]:
        return {"OPENSSL_CONF": str(self.openssl_conf()), "TPM2OPENSSL_TCTI": self.tcti}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "directory": str(self.directory), "tcti": self.tcti,
                "parent_handle": f"0x{self.parent_handle:08x}" if self.parent_handle else "owner primary",
                "non_exportable": True}
