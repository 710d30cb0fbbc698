"""What one issuance writes to the SQLite ledger: the pages its transaction dirties are the WAL frames
(two `pwrite`s each) and the checkpoint's writes that every enrollment pays (issue 24 item 3)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cryptography import x509

from hal.keys.file import generate
from provisioning import authority
from provisioning.station.ledger import Ledger
from provisioning.station.otp import otp_hash
from tests.pki import TRUST_DOMAIN, Pki

NOW = 1_800_000_000
WAL_HEADER, FRAME_HEADER = 32, 24  # https://sqlite.org/fileformat2.html#walformat


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def _frames_of_one_enrollment(ledger: Ledger, path: Path, pki: Pki, device_id: str) -> int:
    ledger.add_otp(device_id, otp_hash(device_id, "otp"), NOW, NOW + 600)
    with sqlite3.connect(path) as other:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL starts empty: what follows is this issuance
        page = other.execute("PRAGMA page_size").fetchone()[0]

    def sign() -> x509.Certificate:
        return authority.device_cert(pki.issuing, generate("ec-p256").public_key(), device_id, TRUST_DOMAIN)

    ledger.issue_with_otp(device_id, otp_hash(device_id, "otp"), f"csr-{device_id}", NOW, sign)
    size = Path(f"{path}-wal").stat().st_size
    return (size - WAL_HEADER) // (page + FRAME_HEADER)


def test_a_first_enrollment_writes_five_pages_its_row_enters_no_predecessor_or_ek_index(
        tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    _frames_of_one_enrollment(ledger, path, pki, "warm-up")  # the first row may allocate pages
    # certs: the row, its serial (primary key), by_request, by_issued_at; otps: the row. Not the
    # predecessor and EK indexes: a first enrollment has neither (7 pages when they were full indexes)
    assert _frames_of_one_enrollment(ledger, path, pki, "pages-1") == 5
    ledger.close()


def test_an_older_ledgers_full_indexes_are_replaced_and_lookups_by_predecessor_and_ek_still_use_an_index(
        tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    with sqlite3.connect(path) as old:  # as a release before the partial indexes left it
        old.execute("DROP INDEX certs_with_predecessor")
        old.execute("DROP INDEX certs_with_ek")
        old.execute("CREATE INDEX certs_by_predecessor ON certs (predecessor)")
        old.execute("CREATE INDEX certs_by_ek ON certs (ek_digest)")
    Ledger(path).close()
    with sqlite3.connect(path) as db:
        indexes = {name: sql for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                                         "AND tbl_name = 'certs'")}
        assert "certs_by_predecessor" not in indexes and "certs_by_ek" not in indexes
        assert "WHERE predecessor IS NOT NULL" in indexes["certs_with_predecessor"]
        assert "WHERE ek_digest IS NOT NULL" in indexes["certs_with_ek"]
        by_predecessor = " ".join(str(r) for r in db.execute(
            "EXPLAIN QUERY PLAN SELECT serial FROM certs WHERE predecessor = ?", ("ab",)))
        by_ek = " ".join(str(r) for r in db.execute(
            "EXPLAIN QUERY PLAN SELECT device_id FROM certs WHERE ek_digest = ? AND kind = 'device'", ("cd",)))
    assert "USING INDEX certs_with_predecessor" in by_predecessor, by_predecessor
    assert "USING INDEX certs_with_ek" in by_ek, by_ek
