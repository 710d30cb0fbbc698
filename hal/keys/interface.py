"""The interface every key store backend implements, for the type checker only.

Callers are typed against `KeyStore` (`hal.keys.open_keystore` returns one) and backends implement it
without subclassing it, so nothing imports this module at run time: neither the class (a Protocol,
the dearest kind of class to build) nor its bytecode is loaded by `tether run` (issue 24).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from hal.keys import DEFAULT_ALGORITHM

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificateIssuerPrivateKeyTypes,
        PublicKeyTypes,
    )

    from hal.keys import TlsKey


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
