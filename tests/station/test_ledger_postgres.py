"""The ledger in a real PostgreSQL server, shared by two stations (one factory, two lines)."""

from __future__ import annotations

import threading
from pathlib import Path

from hal.keys.file import generate
from provisioning import EnrollmentError
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, EstClient
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import start_station, station_cli


def test_two_stations_share_one_postgresql_ledger_and_retries_keep_one_row(tmp_path: Path, postgres: str) -> None:
    directory = tmp_path / "station"
    station_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN, "--db", postgres)
    line_a = start_station(directory, db=postgres)
    line_b = start_station(directory, db=postgres)
    try:
        otp = line_a.otp("pg-dev")
        csr = build_csr(generate("ec-p256"), "pg-dev", TRUST_DOMAIN)
        results: list[object] = []

        def enroll(url: str) -> None:
            try:
                with EstClient(url, str(line_a.ca_file), auth=BasicAuth("pg-dev", otp)) as c:
                    results.append(c.simpleenroll(csr)[0])
            except EnrollmentError as exc:
                results.append(exc)

        # the same OTP and CSR at both lines at once: one certificate, issued once
        threads = [threading.Thread(target=enroll, args=(s.url,)) for s in (line_a, line_b, line_a)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 3 and all(r == results[0] for r in results), results
        rows = line_b.rows("pg-dev")
        assert len(rows) == 1 and rows[0].certificate == results[0]
        listed = line_b.cli("ledger", "list").stdout
        assert rows[0].serial in listed
    finally:
        line_a.proc.stop()
        line_b.proc.stop()
    assert not (directory / "ledger.sqlite").exists()
