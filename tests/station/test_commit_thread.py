"""The default worker (`--threads 0`): the loop computes each request, one commit thread per worker
makes the ledger writes durable. A request waiting for its commit holds up no other connection, and
is answered only once the COMMIT holding its rows returned."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

from hal.keys.file import generate
from lab.procs import wait_until
from provisioning.csr import build_csr
from provisioning.errors import EnrollmentError
from provisioning.est.client import BasicAuth, EstClient
from provisioning.station.otp import new_otp, otp_hash
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import start_station


def _lock_waiters(path: Path) -> int:
    """Processes blocked in flock() on `path` (the kernel lists them in /proc/locks with `->`)."""
    st = os.stat(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and "FLOCK" in line and line.split()[-3] == inode)


def test_an_enrollment_waiting_for_its_commit_holds_up_no_other_connection_and_is_answered_after_it(
        station_dir: Path) -> None:
    station = start_station(station_dir, workers=1)  # one worker: its loop is the one that must not wait
    try:
        device, otp = "commit-thread-1", new_otp()
        ledger = station.ledger()
        now = int(time.time())
        ledger.add_otp(device, otp_hash(device, otp), now, now + 600)
        ledger.close()
        csr = build_csr(generate("ec-p256"), device, TRUST_DOMAIN)
        lock_path = station.directory / "ledger.sqlite.lock"
        # hold the ledger's cross-process write lock, as another worker committing would
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        outcome: dict[str, object] = {}

        def enroll() -> None:
            try:
                with EstClient(station.url, str(station.ca_file), timeout=60, auth=BasicAuth(device, otp)) as c:
                    outcome["leaf"] = c.simpleenroll(csr)[0]
            except EnrollmentError as exc:
                outcome["error"] = exc

        try:
            thread = threading.Thread(target=enroll)
            thread.start()
            wait_until(lambda: _lock_waiters(lock_path) == 1, 30, "the worker's commit thread waiting for the lock")
            # the loop is free: another client is served while the enrollment waits for the disk
            with EstClient(station.url, str(station.ca_file), timeout=10) as other:
                assert other.cacerts(), "the CA chain"
            assert not outcome, f"answered before its COMMIT: {outcome}"
            db = sqlite3.connect(station.directory / "ledger.sqlite")
            assert db.execute("SELECT count(*) FROM certs WHERE device_id = ?", (device,)).fetchone() == (0,)
            db.close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
        thread.join(60)
        assert "leaf" in outcome, outcome
        rows = station.rows(device)
        assert [r.serial for r in rows] == [f"{outcome['leaf'].serial_number:x}"]  # type: ignore[attr-defined]
    finally:
        station.proc.stop()
