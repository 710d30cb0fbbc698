"""The ledger's part of attested enrollment on SQLite and PostgreSQL: `certs.ek_digest` is migrated into a
ledger from before it, and a whole attested enrollment and the allow-list run on a PostgreSQL ledger."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lab.swtpm import EkCa, SoftTpm
from provisioning.station.attest_store import AttestStore
from provisioning.station.ledger import Ledger
from tests.attest.conftest import attest_config, trust_maker
from tests.conftest import run_tether
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import start_station, station_cli

# the certs table as stations before issue 27 made it (every column but ek_digest)
BEFORE = """CREATE TABLE certs (serial TEXT PRIMARY KEY, device_id TEXT NOT NULL, subject TEXT NOT NULL,
    kind TEXT NOT NULL, not_before BIGINT NOT NULL, not_after BIGINT NOT NULL, csr_fingerprint TEXT NOT NULL,
    issued_at BIGINT NOT NULL, revoked_at BIGINT, cert_der {blob} NOT NULL, predecessor TEXT, revoke_reason TEXT,
    supersede_at BIGINT)"""


def columns(ledger: Ledger) -> set[str]:
    with ledger.db.connection() as conn:
        cur = conn.execute("SELECT * FROM certs WHERE 1 = 0")
        names = {getattr(d, "name", None) or d[0] for d in cur.description}
        cur.fetchall()
    return names


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_ledger_from_before_attestation_gains_the_ek_column(backend: str, tmp_path: Path,
                                                              request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        location = str(tmp_path / "old.sqlite")
        with sqlite3.connect(location) as conn:
            conn.execute(BEFORE.format(blob="BLOB"))
    else:
        import psycopg

        location = request.getfixturevalue("postgres")
        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(BEFORE.format(blob="BYTEA"))
    ledger = Ledger(location)
    try:
        assert "ek_digest" in columns(ledger)
        store = AttestStore(ledger)
        store.allow([("sha256:" + "ab" * 32, "dev-1")], "line-1", 1)
        assert store.device_of_ek("sha256:" + "ab" * 32) is None
        assert [a.device_id for a in store.allow_list("line-1")] == ["dev-1"]
    finally:
        ledger.close()


def test_attested_enrollment_and_the_allow_list_on_a_postgresql_ledger(tmp_path: Path, postgres: str, ek_ca: EkCa,
                                                                       attested_tpm: SoftTpm) -> None:
    directory = tmp_path / "station"
    station_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN, "--db", postgres)
    trust_maker(directory, ek_ca, ek_allowlist=True)
    station = start_station(directory, db=postgres, workers=1)
    try:
        config = attest_config(tmp_path, station, "pg-att", enroll={"method": "tpm-attestation", "ek": "ecc"})
        out = run_tether("enroll", config=config)
        assert out.returncode != 0 and "allow-list" in out.stderr
        digest = out.stderr.split("EK ", 1)[1].split(" ", 1)[0]
        station.cli("attest", "allow", "--batch", "pg-line", digest)
        out = run_tether("enroll", config=config)
        assert out.returncode == 0, out.stderr
        ledger = Ledger(postgres)
        try:
            assert AttestStore(ledger).ek_of_devices() == {"pg-att": digest}
        finally:
            ledger.close()
    finally:
        station.proc.stop()
    assert not (directory / "ledger.sqlite").exists()
