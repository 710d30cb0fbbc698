"""A station killed with SIGKILL in the middle of enrollments leaves a consistent ledger, and after a
restart every device whose answer was lost gets the same certificate on retry."""

from __future__ import annotations

import sqlite3
import threading
import time

from hal.keys.file import generate
from lab.procs import wait_until
from provisioning import EnrollmentError
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, EstClient
from provisioning.station.otp import new_otp, otp_hash
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import RunningStation, start_station


def test_sigkill_mid_enrollment_leaves_no_half_rows_and_retries_get_the_same_certificate(
        station: RunningStation) -> None:
    # one OTP per device, stored through the ledger itself: 40 `tether-station otp` runs would dominate
    devices = [(f"crash-{i:03d}", new_otp()) for i in range(40)]
    ledger = station.ledger()
    now = int(time.time())
    for d, o in devices:
        ledger.add_otp(d, otp_hash(d, o), now, now + 600)
    ledger.close()
    csrs = {d: build_csr(generate("ec-p256"), d, TRUST_DOMAIN) for d, _ in devices}
    answered: dict[str, object] = {}
    lock = threading.Lock()

    def enroll(url: str, batch: list[tuple[str, str]]) -> None:
        for device, otp in batch:
            try:
                with EstClient(url, str(station.ca_file), timeout=5, auth=BasicAuth(device, otp)) as c:
                    leaf = c.simpleenroll(csrs[device])[0]
            except EnrollmentError:
                continue
            with lock:
                answered[device] = leaf

    threads = [threading.Thread(target=enroll, args=(station.url, devices[i::4])) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(answered) >= 10, 30, "ten enrollments before the kill")
    station.proc.kill()  # SIGKILL to the whole process group, workers included
    for t in threads:
        t.join(30)

    db = sqlite3.connect(station.directory / "ledger.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    issued = dict(db.execute("SELECT device_id, serial FROM certs WHERE kind = 'device'").fetchall())
    used = dict(db.execute("SELECT device_id, serial FROM otps WHERE used_at IS NOT NULL").fetchall())
    db.close()
    assert issued == used, "a certificate row without its spent OTP (or the reverse) is a half-written issuance"
    assert set(answered) <= set(issued)

    restarted = start_station(station.directory)
    try:
        enroll(restarted.url, devices)  # everyone retries with the same OTP and CSR
        assert set(answered) == {d for d, _ in devices}
        rows = [r for r in restarted.ledger().rows("device") if r.device_id.startswith("crash-")]
        assert len(rows) == len(devices)
        assert all(answered[r.device_id] == r.certificate for r in rows)
    finally:
        restarted.proc.stop()
