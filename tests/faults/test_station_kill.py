"""kill -9 the station (every worker of `tether-station serve --workers 2`) while enrollments are in
flight: the ledger never holds a half-written row, and every device retries and enrolls once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.config import load
from lab.mosquitto import Mosquitto
from lab.procs import wait_until
from provisioning.certs import common_name, load_certificates
from provisioning.station.ledger import Row
from tests.agent_bed import Agent
from tests.integration.test_first_boot import device_config
from tests.station.conftest import RunningStation

ROUNDS, DEVICES = 3, 6


def issued(station: RunningStation) -> int:
    return station.proc.log.read_text(errors="replace").count(" issued serial ")


def check_ledger_whole(station: RunningStation) -> int:
    """Every row is complete and self-consistent; at most one row per device. Returns the row count."""
    with sqlite3.connect(station.directory / "ledger.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = station_rows(station)
    for row in rows:
        cert = row.certificate
        assert format(cert.serial_number, "x") == row.serial, f"row {row.serial}: certificate serial differs"
        assert common_name(cert.subject) == row.device_id and row.csr_fingerprint and row.issued_at
    devices = [r.device_id for r in rows]
    assert len(devices) == len(set(devices)), "a device holds two ledger rows"
    return len(rows)


def station_rows(station: RunningStation) -> list[Row]:
    ledger = station.ledger()
    try:
        return ledger.rows("device")
    finally:
        ledger.close()


def test_station_killed_mid_enrollment_leaves_whole_ledger_rows_and_devices_enroll_once(
        tmp_path: Path, station: RunningStation, station_broker: Mosquitto) -> None:
    issued_before_kill = []
    for round_ in range(ROUNDS):
        ids = [f"dev-s{round_}{n}" for n in range(DEVICES)]
        configs = [device_config(tmp_path, station, station_broker, d) for d in ids]
        before = issued(station)
        agents = [Agent(c) for c in configs]
        try:
            # the first certificate of the round is out: the others are being signed or on the wire
            wait_until(lambda n=before: issued(station) > n, 30, "the round's first enrollment")
            station.proc.kill()
            rows = check_ledger_whole(station)
            issued_before_kill.append(sum(1 for r in station_rows(station) if r.device_id in ids))
            station.restart()  # the same port: the devices' URL
            for agent in agents:
                agent.wait_status(session="online", timeout=60)
        finally:
            for agent in agents:
                agent.stop()
        for device_id, config in zip(ids, configs, strict=True):
            device_rows = [r for r in station_rows(station) if r.device_id == device_id]
            assert len(device_rows) == 1, f"{device_id}: {len(device_rows)} ledger rows"
            leaf = load_certificates((Path(load(config).certs_dir) / "chain.pem").read_bytes())[0]
            assert format(leaf.serial_number, "x") == device_rows[0].serial
        assert rows >= 1
    print(f"\nFIGURES station-kill-9: kills={ROUNDS}, devices={ROUNDS * DEVICES}, issued before each kill "
          f"{issued_before_kill} of {DEVICES}, half-written rows=0, every device enrolled once")
