"""The default worker (`--threads 0`): the loop computes each request, one commit thread per worker
makes the ledger writes durable. A request waiting for its commit holds up no other connection, and
is answered only once the COMMIT holding its rows returned."""

from __future__ import annotations

import fcntl
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hal.keys.file import generate
from lab.procs import wait_until
from provisioning import EnrollmentError
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, EstClient
from provisioning.station import loop
from provisioning.station.ca import Station
from provisioning.station.enrollment import Enrollment
from provisioning.station.otp import new_otp, otp_hash
from provisioning.station.server import tls_context
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
        assert "computed by each worker's loop" in (station_dir / "serve.log").read_text(), "the default mode"
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


@pytest.fixture
def in_process(station_dir: Path) -> Iterator[tuple[loop.EstServer, str, Path]]:
    """One worker's loop (`--threads 0`) served from a thread of this process, to read its counters."""
    station = Station(station_dir)
    ledger = station.open_ledger()
    certfile, keyfile = station.ensure_server_cert("127.0.0.1", ledger)
    sock = socket.create_server(("127.0.0.1", 0))
    server = loop.EstServer(sock, Enrollment(station, ledger), tls_context(station, str(certfile), str(keyfile)), 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server, f"https://127.0.0.1:{sock.getsockname()[1]}", station_dir / "ca.pem"
    finally:
        server.stop()
        thread.join(10)
        sock.close()
        ledger.close()


def _enroll(server: loop.EstServer, url: str, ca: Path, device: str, commit_seconds: float) -> None:
    ledger = server.enrollment.ledger
    otp, now = new_otp(), int(time.time())
    ledger.add_otp(device, otp_hash(device, otp), now, now + 600)
    ledger.db.commit_seconds = commit_seconds  # what the worker measured of its disk so far
    with EstClient(url, str(ca), timeout=30, auth=BasicAuth(device, otp)) as client:
        client.simpleenroll(build_csr(generate("ec-p256"), device, TRUST_DOMAIN))


@pytest.mark.parametrize(("commit_seconds", "others", "inline"), [
    (0.0, 1, True),      # commits are quick: the loop makes its own, though another connection is open
    (1.0, 1, False),     # a slow disk: a commit would hold that connection up, so the commit thread makes it
    (1.0, 0, True),      # a slow disk, but nobody else to hold up
], ids=["quick-disk", "slow-disk-others-waiting", "slow-disk-alone"])
def test_the_loop_commits_itself_only_when_that_holds_nobody_up(
        in_process: tuple[loop.EstServer, str, Path], commit_seconds: float, others: int, inline: bool) -> None:
    server, url, ca = in_process
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(others)]  # shaking hands, never finishing
    try:
        wait_until(lambda: len(server.conns) == others, 10, f"{others} connection(s) held by the loop")
        _enroll(server, url, ca, f"inline-{int(commit_seconds)}-{others}", commit_seconds)
    finally:
        for s in idle:
            s.close()
    compute = server.compute
    assert compute.committer is not None
    assert (compute.inline_commits, compute.committer.writes) == ((1, 0) if inline else (0, 1))
