"""Private keys as PKCS#8 PEM files on the filesystem, mode 0600, optionally passphrase-encrypted."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from hal import HalError, KeyStoreError, storage
from hal.keys import ALGORITHMS, DEFAULT_ALGORITHM, TlsKey, check_label

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificateIssuerPrivateKeyTypes,
        PublicKeyTypes,
    )


def generate(algorithm: str) -> CertificateIssuerPrivateKeyTypes:
    """A fresh private key for one of `ALGORITHMS` (also used by the station for its CA keys)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if algorithm == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[4:]))
    raise KeyStoreError(f"key algorithm {algorithm!r} is unsupported: expected one of {', '.join(ALGORITHMS)}")


def to_pem(key: CertificateIssuerPrivateKeyTypes, passphrase: bytes | None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def load_pem(data: bytes, passphrase: bytes | None, where: str) -> CertificateIssuerPrivateKeyTypes:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # encrypted without passphrase, or passphrase for a plain key
        raise KeyStoreError(f"{where}: {exc}; set [keys] passphrase_file to match the key") from exc
    except ValueError as exc:
        raise KeyStoreError(f"{where}: not a usable private key ({exc}); wrong passphrase or corrupt file") \
            from exc
    return key  # type: ignore[return-value]


def read_passphrase(path: str) -> bytes:
    """The first line of a passphrase file, without the newline; KeyStoreError if missing or empty."""
    try:
        data = storage.read_bytes(path)
    except HalError as exc:
        raise KeyStoreError(f"{path}: cannot read the key passphrase ({exc}); check [keys] passphrase_file") \
            from None
    lines = (data or b"").splitlines()
    if data is None or not lines or not lines[0].strip():
        raise KeyStoreError(f"{path}: the key passphrase file is {'missing' if data is None else 'empty'}; "
                            "check [keys] passphrase_file")
    return lines[0].strip()


class FileKeyStore:
    """Keys in `<directory>/<label>.key.pem`."""

    backend = "file"

    def __init__(self, directory: str | os.PathLike[str], passphrase: bytes | None = None, passphrase_file: str = "",
                 **_: Any) -> None:
        self.directory = os.fspath(directory)
        self.passphrase = passphrase or (read_passphrase(passphrase_file) if passphrase_file else None)

    def path(self, label: str) -> str:
        return os.path.join(self.directory, f"{check_label(label)}.key.pem")

    def exists(self, label: str) -> bool:
        return os.path.isfile(self.path(label))

    def create(self, label: str, algorithm: str = DEFAULT_ALGORITHM) -> None:
        path = self.path(label)
        if os.path.exists(path):
            raise KeyStoreError(f"{path}: a key with label {label!r} already exists; delete it first")
        storage.ensure_dir(self.directory)
        storage.atomic_write(path, to_pem(generate(algorithm), self.passphrase), storage.SECRET_MODE)

    def delete(self, label: str) -> None:
        storage.remove(self.path(label))

    def rename(self, label: str, new_label: str) -> None:
        src, dst = self.path(label), self.path(new_label)
        if not os.path.exists(src):
            raise KeyStoreError(f"{src}: no key with label {label!r} to promote")
        os.replace(src, dst)
        storage.fsync_dir(self.directory)

    def _load(self, label: str) -> CertificateIssuerPrivateKeyTypes:
        path = self.path(label)
        data = storage.read_bytes(path)
        if data is None:
            raise KeyStoreError(f"{path}: no key with label {label!r}; run `tether keygen`")
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            raise KeyStoreError(f"{path}: permissions {mode:o} let others read the private key; "
                                "expected 600 (chmod 600 it after checking it was not copied)")
        return load_pem(data, self.passphrase, path)

    def public_key(self, label: str) -> PublicKeyTypes:
        return self._load(label).public_key()

    @contextmanager
    def signer(self, label: str) -> Iterator[CertificateIssuerPrivateKeyTypes]:
        yield self._load(label)

    def tls_key(self, label: str) -> TlsKey:
        path = self.path(label)
        if not os.path.isfile(path):
            raise KeyStoreError(f"{path}: no key with label {label!r}; run `tether keygen`")
        return TlsKey(keyfile=path, password=self.passphrase)

    def tls_env(self) -> dict[str, str]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "directory": self.directory,
                "encrypted": self.passphrase is not None}
