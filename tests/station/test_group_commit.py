"""Issuances that arrive while a commit is under way share the next SQLite transaction (one fsync),
each answered only once that transaction is committed, a refused one rolled back alone."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography import x509

from hal.keys.file import generate
from lab.procs import wait_until
from provisioning import authority
from provisioning.station.errors import Refusal
from provisioning.station.ledger import Ledger, Query
from provisioning.station.otp import otp_hash
from tests.pki import TRUST_DOMAIN, Pki

NOW = 1_800_000_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def test_issuances_queued_behind_a_commit_share_one_transaction_and_return_only_once_it_is_on_disk(
        tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    devices = [f"group-{i}" for i in range(4)]
    for d in devices:
        ledger.add_otp(d, otp_hash(d, "otp"), NOW, NOW + 600)
    outcome: dict[str, object] = {}

    def enroll(device_id: str, otp: str) -> None:
        def sign() -> x509.Certificate:
            return authority.device_cert(pki.issuing, generate("ec-p256").public_key(), device_id, TRUST_DOMAIN)
        try:
            row, _ = ledger.issue_with_otp(device_id, otp_hash(device_id, otp), f"csr-{device_id}", NOW, sign)
        except Refusal as refusal:
            outcome[f"{device_id}/{otp}"] = refusal
            return
        # the moment the call returns, another connection (another process) sees the row: committed
        other = sqlite3.connect(path)
        found = other.execute("SELECT serial FROM certs WHERE serial = ?", (row.serial,)).fetchone()
        outcome[f"{device_id}/{otp}"] = found
        other.close()

    # hold the ledger's cross-process write lock, as another station worker committing would
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    before = ledger.db.group.batches
    first = threading.Thread(target=enroll, args=(devices[0], "otp"))
    first.start()
    wait_until(lambda: ledger.db.group.committing and ledger.db.group.waiting == 0, 30,
               "the first issuance leading its own commit, waiting for the lock")
    rest = [threading.Thread(target=enroll, args=(d, "otp")) for d in devices[1:]]
    rest.append(threading.Thread(target=enroll, args=(devices[1], "wrong")))  # refused inside the batch
    for t in rest:
        t.start()
    wait_until(lambda: ledger.db.group.waiting == 4, 30, "four issuances queued behind the first commit")
    fcntl.flock(lock, fcntl.LOCK_UN)
    os.close(lock)
    for t in [first, *rest]:
        t.join(30)

    assert ledger.db.group.batches - before == 2, "the four queued issuances should share one transaction"
    assert all(isinstance(outcome[f"{d}/otp"], tuple) for d in devices), outcome  # visible when its call returned
    refused = outcome[f"{devices[1]}/wrong"]
    assert isinstance(refused, Refusal) and refused.status == 401
    assert len({row.device_id for row in ledger.rows("device")}) == 4
    ledger.close()


def test_an_issuance_that_fails_after_writing_leaves_nothing_and_its_batch_commits_the_rest(
        tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")

    def half_done(q: Query) -> None:
        q("INSERT INTO otps (digest, device_id, created_at, expires_at) VALUES ('half', 'dev-half', 1, 2)", ())
        raise Refusal(403, "refused after its first write")

    def whole(q: Query) -> str:
        q("INSERT INTO otps (digest, device_id, created_at, expires_at) VALUES ('whole', 'dev-whole', 1, 2)", ())
        return "done"

    with pytest.raises(Refusal, match="after its first write"):
        ledger.db.group.run(half_done)
    assert ledger.db.group.run(whole) == "done"
    assert ledger.find_otp("half") is None  # rolled back to its savepoint, though its transaction committed
    assert ledger.find_otp("whole") is not None
    ledger.close()


def test_write_now_runs_and_commits_when_the_write_lock_is_free_and_never_waits_for_it(tmp_path: Path) -> None:
    """The worker's loop commits a write itself only when no other writer holds the lock (a commit
    thread, another worker): it must never wait for one."""
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ran: list[str] = []

    def work(q: Query) -> str:
        ran.append("ran")
        q("INSERT INTO otps (digest, device_id, created_at, expires_at) VALUES (?, ?, ?, ?)", ("d1", "dev", 1, 2))
        return "done"

    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another worker's commit
    try:
        assert ledger.db.write_now(work) == (False, None)
        assert ran == []
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
    assert ledger.db.write_now(work) == (True, "done")
    other = sqlite3.connect(path)  # committed when it returned
    assert other.execute("SELECT device_id FROM otps WHERE digest = 'd1'").fetchone() == ("dev",)
    other.close()
    ledger.close()
