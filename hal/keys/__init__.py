"""Key stores: where the device's private keys live, behind one small interface.

Callers get handles (a signer for `cryptography`, a key file plus environment for `ssl`), never the
private key bytes of a hardware key. A backend is a module plus one line in `BACKENDS`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from hal.errors import KeyStoreError
from hal.registry import load_backend

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificateIssuerPrivateKeyTypes,
        PublicKeyTypes,
    )

ALGORITHMS = ("ec-p256", "rsa-2048", "rsa-3072")
DEFAULT_ALGORITHM = "ec-p256"

# name -> "module:Class"; imported only when that backend is chosen, so a file-key device never
# imports tpm2-pytss.
BACKENDS = {
    "file": "hal.keys.file:FileKeyStore",
    "tpm": "hal.keys.tpm:TpmKeyStore",
}


class TlsKey(NamedTuple):
    """What `ssl.SSLContext.load_cert_chain` needs for a key.

    `env` holds variables that must be in the process environment before `ssl` is first imported
    (the OpenSSL provider configuration of a TPM key); it is empty for file keys.
    """

    keyfile: str
    password: bytes | None = None
    env: dict[str, str] = {}  # never mutated: shared default of an immutable tuple


class KeyStore(Protocol):
    """A place for private keys, addressed by label (`device`, `device.next`, ...)."""

    backend: str

    def exists(self, label: str) -> bool:
        """True when a key with this label is stored."""
        ...

    def create(self, label: str, algorithm: str = DEFAULT_ALGORITHM) -> None:
        """Generate a new key; raises KeyStoreError if the label is taken or the algorithm unsupported."""
        ...

    def delete(self, label: str) -> None:
        """Remove the key; no error when it does not exist."""
        ...

    def rename(self, label: str, new_label: str) -> None:
        """Atomically move a key to another label, replacing what was there (key promotion)."""
        ...

    def public_key(self, label: str) -> PublicKeyTypes:
        """The key's public half as a `cryptography` object."""
        ...

    def signer(self, label: str) -> AbstractContextManager[CertificateIssuerPrivateKeyTypes]:
        """A context manager yielding a private-key object `cryptography` can sign CSRs with."""
        ...

    def tls_key(self, label: str) -> TlsKey:
        """The key file, password and environment `ssl` needs to use this key for mutual TLS."""
        ...

    def tls_env(self) -> dict[str, str]:
        """Environment `ssl` needs before its first import to use keys of this store ({} for files)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for `tether status`: backend, location, algorithm support."""
        ...


def check_label(label: str) -> str:
    """Labels become file names: keep them to a safe alphabet."""
    if not label or not all(c.isalnum() or c in "._-" for c in label) or label.startswith("."):
        raise KeyStoreError(f"key label {label!r} is invalid: use letters, digits, '.', '_' or '-'")
    return label


def open_keystore(backend: str, directory: str | Path, **options: Any) -> KeyStore:
    """Instantiate the key store named `backend` keeping its files in `directory`.

    `options` are backend specific (`passphrase` for file keys; `tcti` for the TPM). Raises
    KeyStoreError for an unknown backend or one whose library is missing.
    """
    cls = load_backend(BACKENDS, backend, "key", KeyStoreError, " (for 'tpm', install tether[tpm] and libtss2)")
    store: KeyStore = cls(Path(directory), **options)
    return store
