"""Facts about the stored chain (subject, serial, validity) readable without `cryptography`.

`CertStore` writes `chain.json` beside `chain.pem`; the runtime reads it on its start-up path to
decide whether the chain is still valid and when to renew, without parsing X.509.
"""

from __future__ import annotations

import json
from pathlib import Path

from hal import storage

FACTS = "chain.json"


def read_facts(directory: str | Path) -> dict[str, object] | None:
    """The facts of the current chain without parsing X.509 (None when there is no chain)."""
    data = storage.read_bytes(Path(directory) / FACTS)
    if data is None:
        return None
    try:
        facts = json.loads(data)
    except ValueError:
        return None  # rewritten from chain.pem by CertStore.refresh_facts()
    return facts if isinstance(facts, dict) else None
