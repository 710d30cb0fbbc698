"""A test PKI built with the product's own `provisioning.authority` profiles."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from hal.keys.file import generate
from provisioning import authority
from provisioning.authority import Issuer
from provisioning.certs import to_pem

TRUST_DOMAIN = "test.tether"


def key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Pki:
    root: Issuer
    issuing: Issuer
    directory: Path

    @classmethod
    def create(cls, directory: Path, name: str = "Test") -> Pki:
        root_key = generate("ec-p256")
        root = Issuer(authority.root_ca(root_key, cn=f"{name} Root CA"), root_key)
        inter_key = generate("ec-p256")
        issuing = Issuer(authority.intermediate_ca(root, inter_key.public_key(), cn=f"{name} Issuing CA"),
                         inter_key)
        directory.mkdir(parents=True, exist_ok=True)
        pki = cls(root, issuing, directory)
        (directory / "root.pem").write_bytes(to_pem([root.cert]))
        (directory / "ca-chain.pem").write_bytes(to_pem([issuing.cert, root.cert]))
        return pki

    @property
    def root_file(self) -> Path:
        return self.directory / "root.pem"

    @property
    def ca_chain_file(self) -> Path:
        return self.directory / "ca-chain.pem"

    def device_chain(self, public_key: Any, device_id: str, **kw: Any) -> list:
        leaf = authority.device_cert(self.issuing, public_key, device_id, TRUST_DOMAIN, **kw)
        return [leaf, self.issuing.cert, self.root.cert]

    def server_files(self, name: str = "broker", dns: tuple[str, ...] = ("localhost",),
                     ips: tuple[str, ...] = ("127.0.0.1",), **kw: Any) -> tuple[Path, Path]:
        """(chain file, key file) for a server certificate issued by this PKI."""
        key = generate("ec-p256")
        cert = authority.server_cert(self.issuing, key.public_key(), name, dns, ips, **kw)
        chain = self.directory / f"{name}.pem"
        keyfile = self.directory / f"{name}.key"
        chain.write_bytes(to_pem([cert, self.issuing.cert]))
        keyfile.write_bytes(key_pem(key))
        keyfile.chmod(0o600)
        return chain, keyfile

    def device_files(self, device_id: str, **kw: Any) -> tuple[Path, Path]:
        """(chain file, key file) for a device whose key the PKI made (as `tether-station issue` does)."""
        key = generate("ec-p256")
        chain = self.device_chain(key.public_key(), device_id, **kw)
        certfile = self.directory / f"{device_id}.pem"
        keyfile = self.directory / f"{device_id}.key"
        certfile.write_bytes(to_pem(chain))
        keyfile.write_bytes(key_pem(key))
        keyfile.chmod(0o600)
        return certfile, keyfile


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
