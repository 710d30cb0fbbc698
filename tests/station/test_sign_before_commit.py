"""The certificate is signed before the issuing transaction (the worker's loop signs, its commit thread
only runs statements), so the transaction decides again what another worker may have changed since:
two workers racing on one password both sign, one issues, the other is refused, and the certificate
the refused one signed is never recorded, answered or logged."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from hal.keys.file import generate
from provisioning.authority import Issued
from provisioning.csr import build_csr
from provisioning.station.ca import Station
from provisioning.station.enrollment import CSR_TYPE, ENROLL, Enrollment, Request
from provisioning.station.errors import Refusal
from provisioning.station.ledger import serial_hex
from provisioning.station.otp import new_otp, otp_hash
from provisioning.station.routes import respond_steps
from provisioning.station.wire import RequestReader
from tests.pki import TRUST_DOMAIN


class Worker:
    """One station worker's decisions, its own ledger connections, and every certificate it signed."""

    def __init__(self, station_dir: Path) -> None:
        self.station = Station(station_dir)
        self.ledger = self.station.open_ledger()
        self.enrollment = Enrollment(self.station, self.ledger)
        self.signed: list[Issued] = []
        issue = self.station.issue_device

        def recording(*args: Any, **kwargs: Any) -> Issued:
            issued = issue(*args, **kwargs)
            self.signed.append(issued)
            return issued

        self.station.issue_device = recording  # type: ignore[method-assign]


@pytest.fixture
def workers(station_dir: Path) -> Iterator[tuple[Worker, Worker]]:
    pair = (Worker(station_dir), Worker(station_dir))
    yield pair
    for worker in pair:
        worker.ledger.close()


def _csr_body(device: str) -> bytes:
    import base64

    return base64.b64encode(build_csr(generate("ec-p256"), device, TRUST_DOMAIN).public_bytes(Encoding.DER))


def test_two_workers_racing_on_one_password_issue_once_and_the_loser_signed_certificate_goes_nowhere(
        workers: tuple[Worker, Worker], station_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = workers
    device, otp = "race-1", new_otp()
    now = int(time.time())
    a.ledger.add_otp(device, otp_hash(device, otp), now, now + 600)
    # both computed (password checked, policy, signed) before either transaction: what two loops do
    steps_a = a.enrollment.steps(Request(ENROLL, CSR_TYPE, _csr_body(device), (device, otp)))
    steps_b = b.enrollment.steps(Request(ENROLL, CSR_TYPE, _csr_body(device), (device, otp)))
    work_a, work_b = next(steps_a), next(steps_b)
    assert len(a.signed) == len(b.signed) == 1, "each worker signs before its transaction"
    with caplog.at_level(logging.DEBUG, logger="tether.station"):
        with pytest.raises(StopIteration) as won:
            steps_a.send(a.ledger.db.write(work_a))
        try:
            b.ledger.db.write(work_b)
        except Refusal as refusal:  # what the commit thread hands back, thrown in where it was yielded
            with pytest.raises(Refusal) as lost:
                steps_b.throw(refusal)
        else:
            pytest.fail("the second issuance with one password was not refused in its transaction")
    assert lost.value.status == 401 and "already used for another CSR" in lost.value.reason
    answer = won.value.value
    loser = serial_hex(b.signed[0].serial)
    rows = a.ledger.rows("device")
    assert [r.serial for r in rows] == [answer.row.serial] == [serial_hex(a.signed[0].serial)]
    db = sqlite3.connect(station_dir / "ledger.sqlite")
    dump = "\n".join(db.iterdump())
    db.close()
    assert loser not in dump.lower(), "the discarded certificate's serial was recorded"
    assert b.signed[0].der.hex() not in dump.lower(), "the discarded certificate was recorded"
    assert loser not in caplog.text.lower() and loser not in lost.value.reason.lower()


def test_a_failed_commit_answers_500_not_the_certificate(workers: tuple[Worker, Worker]) -> None:
    worker, _ = workers
    device, otp = "race-2", new_otp()
    now = int(time.time())
    worker.ledger.add_otp(device, otp_hash(device, otp), now, now + 600)
    body = _csr_body(device)
    import base64 as b64

    auth = b64.b64encode(f"{device}:{otp}".encode()).decode()
    raw = (f"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\nContent-Type: {CSR_TYPE}\r\n"
           f"Authorization: Basic {auth}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    reader = RequestReader(64 * 1024)
    reader.feed(raw)
    request = reader.next()
    assert request is not None
    steps = respond_steps(worker.enrollment, request, None, "127.0.0.1")
    next(steps)  # its issuance, which the commit thread's COMMIT then fails (disk full)
    with pytest.raises(StopIteration) as done:
        steps.throw(sqlite3.OperationalError("database or disk is full"))
    response = done.value.value
    assert response.status == 500, response
    assert worker.ledger.rows("device") == []
