"""The operators' console shows which devices were TPM-attested and by which EK, and the ledger export
carries it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lab.swtpm import EkCa, SoftTpm
from tests.attest.conftest import attest_config, trust_maker
from tests.conftest import run_tether
from tests.console.conftest import start_console_station


def test_the_console_and_ledger_export_name_the_ek_of_attested_devices(tmp_path: Path, station_dir: Path,
                                                                       ek_ca: EkCa, attested_tpm: SoftTpm) -> None:
    trust_maker(station_dir, ek_ca)
    station = start_console_station(station_dir)
    try:
        assert run_tether("enroll", config=attest_config(tmp_path, station, "dev-att")).returncode == 0
        admin = station.operator("alice", "admin", tmp_path / "alice")
        ledger = station.ledger()
        try:
            with ledger.db.transaction(write=False) as q:
                [(serial, digest)] = q("SELECT serial, ek_digest FROM certs WHERE device_id = 'dev-att'", ())
        finally:
            ledger.close()
        page = admin.curl(f"{station.console_url}/devices/dev-att").stdout
        assert digest in page and serial in page
        export = admin.curl(f"{station.console_url}/exports/ledger.csv").stdout.rsplit("\n", 1)[0]
        rows = {r["device_id"]: r for r in csv.DictReader(io.StringIO(export))}
        assert rows["dev-att"]["ek_digest"] == digest
    finally:
        station.proc.stop()
