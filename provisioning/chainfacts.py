"""Facts about the stored chain (subject, serial, validity) readable without `cryptography`.

`CertStore` writes `chain.json` beside `chain.pem`; the runtime reads it on its start-up path to
decide whether the chain is still valid and when to renew, without parsing X.509. The facts carry
the SHA-256 of the chain.pem they describe: a power cut between replacing chain.pem and rewriting
chain.json leaves facts about the old chain, and they must not be believed (a renewal due at once,
a valid chain called expired). Hashing a few KB is cheap; parsing X.509 at every boot is not.
"""

from __future__ import annotations

import hashlib
import os

from hal import storage

FACTS = "chain.json"
CHAIN = "chain.pem"
DIGEST_KEY = "chain_sha256"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_facts(directory: str | os.PathLike[str]) -> dict[str, object] | None:
    """The facts of the current chain without parsing X.509, or None when there is no chain or when
    chain.json is missing, unreadable or describes another chain.pem than the one on disk (the caller
    then rebuilds it with `CertStore.refresh_facts()`)."""
    facts_file = os.path.join(directory, FACTS)
    chain = storage.read_bytes(os.path.join(directory, CHAIN))
    data = storage.read_bytes(facts_file)
    if chain is None or data is None:
        return None
    try:
        facts = storage.parse_json(data)
    except ValueError as exc:
        storage.set_aside(facts_file, f"not JSON ({exc})", "rebuilding it from chain.pem")
        return None
    if not isinstance(facts, dict):
        storage.set_aside(facts_file, f"expected a JSON object, found {type(facts).__name__}",
                          "rebuilding it from chain.pem")
        return None
    if facts.get(DIGEST_KEY) != digest(chain):  # stale, not corrupt: describes another chain.pem
        return None
    return facts
