"""`CertStore`: the device's certificate chain on disk, saved only after the policy accepts it.

Files in the store's directory:
  chain.pem       the chain in use (leaf, intermediates, root)
  chain.prev.pem  the chain it replaced, kept for recovery and inspection
  chain.next.pem  a renewed chain waiting to be proven by a session before promotion
  chain.json      facts about chain.pem (subject, serial, validity) so the runtime can schedule
                  renewal without importing `cryptography` on its start-up path
Each is written atomically, so a power cut leaves the old or the new chain, never a mix.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from cryptography import x509

from hal import storage
from provisioning import ProvisioningError
from provisioning.certs import common_name, load_certificates, serial_of, subject_of, to_pem
from provisioning.chainfacts import DIGEST_KEY, FACTS, digest
from provisioning.policy import ChainPolicy

CURRENT, PREVIOUS, STAGED = "chain.pem", "chain.prev.pem", "chain.next.pem"


def chain_facts(chain: list[x509.Certificate], pem: bytes | None = None) -> dict[str, object]:
    """What `tether status` and the renewal schedule need to know about a chain, as plain JSON, keyed
    by the SHA-256 of its PEM file (`pem`, default: the chain as `CertStore` writes it)."""
    leaf = chain[0]
    return {
        DIGEST_KEY: digest(to_pem(chain) if pem is None else pem),
        "subject": subject_of(leaf),
        "common_name": common_name(leaf.subject),
        "issuer": leaf.issuer.rfc4514_string(),
        "serial": serial_of(leaf),
        "not_before": int(leaf.not_valid_before_utc.timestamp()),
        "not_after": int(leaf.not_valid_after_utc.timestamp()),
        "root": subject_of(chain[-1]),
        "length": len(chain),
    }


class CertStore:
    def __init__(self, directory: str | Path, policy: ChainPolicy) -> None:
        self.directory = Path(directory)
        self.policy = policy

    def path(self, name: str = CURRENT) -> Path:
        return self.directory / name

    def load(self, name: str = CURRENT) -> list[x509.Certificate] | None:
        """The stored chain, or None if there is none. Raises PemError if the file is corrupt."""
        data = storage.read_bytes(self.path(name))
        if data is None:
            return None
        return load_certificates(data, str(self.path(name)))

    def check(self, chain: list[x509.Certificate], device_id: str, device_key: object,
              now: dt.datetime | None = None) -> None:
        self.policy.check_chain(chain, device_id=device_id, device_key=device_key, now=now)

    def save(self, chain: list[x509.Certificate], device_id: str, device_key: object,
             now: dt.datetime | None = None) -> None:
        """Check `chain` against the policy, then make it the current chain.

        The previous chain is copied to chain.prev.pem before the current one is replaced. On a
        policy failure (PolicyError) or a write failure (StorageError), nothing on disk changes.
        """
        self.check(chain, device_id, device_key, now)
        old = storage.read_bytes(self.path(CURRENT))
        if old is not None:
            storage.atomic_write(self.path(PREVIOUS), old, storage.PUBLIC_MODE)
        storage.atomic_write(self.path(CURRENT), to_pem(chain), storage.PUBLIC_MODE)
        self._write_facts(chain)

    def _write_facts(self, chain: list[x509.Certificate], pem: bytes | None = None) -> dict[str, object]:
        facts = chain_facts(chain, pem)
        storage.atomic_write(self.path(FACTS), json.dumps(facts, indent=1).encode(), storage.PUBLIC_MODE)
        return facts

    def refresh_facts(self) -> dict[str, object] | None:
        """Rewrite chain.json from chain.pem (after a crash between the two writes, or an upgrade)."""
        data = storage.read_bytes(self.path(CURRENT))
        if data is None:
            storage.remove(self.path(FACTS))
            return None
        return self._write_facts(load_certificates(data, str(self.path(CURRENT))), data)

    def stage(self, chain: list[x509.Certificate], device_id: str, device_key: object,
              now: dt.datetime | None = None) -> None:
        """Keep a renewed chain beside the current one until a session proves it (see `promote`)."""
        self.check(chain, device_id, device_key, now)
        storage.atomic_write(self.path(STAGED), to_pem(chain), storage.PUBLIC_MODE)

    def promote(self) -> None:
        """Make the staged chain current (the current one becomes chain.prev.pem)."""
        staged = self.path(STAGED)
        if not staged.exists():
            raise ProvisioningError(f"{staged}: no staged chain to promote")
        current = storage.read_bytes(self.path(CURRENT))
        if current is not None:
            storage.atomic_write(self.path(PREVIOUS), current, storage.PUBLIC_MODE)
        os.replace(staged, self.path(CURRENT))
        storage.fsync_dir(self.directory)
        self.refresh_facts()

    def discard_staged(self) -> None:
        storage.remove(self.path(STAGED))
