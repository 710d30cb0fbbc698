"""The ledger knows each certificate's predecessor: revocation follows the lineage, re-enrollment
supersedes, a device holds at most N valid certificates; the same in SQLite and in a real PostgreSQL,
and a ledger written before lineage existed is migrated when opened."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from hal.keys.file import generate
from provisioning import authority
from provisioning.station.errors import Refusal, StationError
from provisioning.station.ledger import Bar, Ledger
from tests.pki import TRUST_DOMAIN, Pki

NOW = 1_800_000_000
GRACE = 3600


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["sqlite", "postgresql"])
def make_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Ledger]]:
    opened: list[Ledger] = []
    location = str(tmp_path / "ledger.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres")

    def make(**kw: int) -> Ledger:
        ledger = Ledger(location, max_valid=kw.get("max_valid", 2), supersede_grace=kw.get("grace", GRACE))
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


def signer(pki: Pki, device_id: str) -> Callable[[], x509.Certificate]:
    return lambda: authority.device_cert(pki.issuing, generate("ec-p256").public_key(), device_id, TRUST_DOMAIN)


def enroll(ledger: Ledger, pki: Pki, device_id: str, now: int = NOW, predecessor: str | None = None) -> str:
    row, reused = ledger.issue(device_id, f"csr-{now}-{predecessor}", now, signer(pki, device_id),
                               predecessor=predecessor)
    assert not reused
    return row.serial


def state(ledger: Ledger, serial: str, now: int = NOW) -> tuple[int, str] | None:
    row = ledger.get(serial)
    assert row is not None
    return row.revocation(now)


def test_revoking_a_stolen_serial_revokes_what_the_thief_reenrolled_to(make_ledger: Callable[..., Ledger],
                                                                       pki: Pki) -> None:
    ledger = make_ledger()
    victim = enroll(ledger, pki, "dev-1")
    thief = enroll(ledger, pki, "dev-1", NOW + 10, predecessor=victim)        # the stolen key re-enrolls
    thief_next = enroll(ledger, pki, "dev-1", NOW + 20, predecessor=thief)    # and renews its own
    other = enroll(ledger, pki, "dev-2")
    assert ledger.get(thief).predecessor == victim  # type: ignore[union-attr]

    revoked = ledger.revoke(victim, NOW + 30, "keyCompromise")
    assert {r.serial for r in revoked} == {victim, thief, thief_next}
    for serial in (victim, thief, thief_next):  # (victim was already superseded at NOW + 20: at most 2 valid)
        assert state(ledger, serial, NOW + 30) in ((NOW + 30, "keyCompromise"), (NOW + 20, "keyCompromise"))
    assert state(ledger, other, NOW + 30) is None
    # a renewal from anywhere in the revoked lineage is refused, and nothing is written
    with pytest.raises(Refusal) as refused:
        enroll(ledger, pki, "dev-1", NOW + 40, predecessor=thief_next)
    assert refused.value.status == 403 and "revoked (keyCompromise)" in refused.value.reason
    assert len([r for r in ledger.rows() if r.device_id == "dev-1"]) == 3
    with pytest.raises(StationError, match="already revoked"):
        ledger.revoke(victim, NOW + 50)


def test_reenrollment_supersedes_the_predecessor_once_the_new_certificate_is_used(
        make_ledger: Callable[..., Ledger], pki: Pki) -> None:
    ledger = make_ledger()
    first = enroll(ledger, pki, "dev-1")
    second = enroll(ledger, pki, "dev-1", NOW + 10, predecessor=first)
    assert state(ledger, first, NOW + 10) is None  # the device may not have stored `second` yet
    ledger.presented(second, NOW + 20)
    assert state(ledger, first, NOW + 20) == (NOW + 20, "superseded")


def test_an_unused_successor_supersedes_its_predecessor_after_the_grace_period(
        make_ledger: Callable[..., Ledger], pki: Pki) -> None:
    ledger = make_ledger()
    first = enroll(ledger, pki, "dev-1")
    enroll(ledger, pki, "dev-1", NOW + 10, predecessor=first)
    assert state(ledger, first, NOW + 10 + GRACE - 1) is None
    assert state(ledger, first, NOW + 10 + GRACE) == (NOW + 10 + GRACE, "superseded")
    ledger.sweep(NOW + 10 + GRACE)  # the next write records it (a CRL lists it before that: Station.ledger_crl)
    row = ledger.get(first)
    assert row is not None and (row.revoked_at, row.revoke_reason) == (NOW + 10 + GRACE, "superseded")
    # revoking the superseded certificate for compromise still reaches its lineage
    revoked = ledger.revoke(first, NOW + 2 * GRACE, "keyCompromise")
    assert len(revoked) == 2 and all(r.revoke_reason == "keyCompromise" for r in revoked)


def test_a_device_holds_at_most_max_valid_certificates(make_ledger: Callable[..., Ledger], pki: Pki) -> None:
    ledger = make_ledger(max_valid=2)
    serials = [enroll(ledger, pki, "dev-1", NOW + i) for i in range(4)]  # e.g. four bootstrap enrollments
    valid = [s for s in serials if state(ledger, s, NOW + 10) is None]
    assert valid == serials[-2:]
    assert {state(ledger, s, NOW + 10) for s in serials[:2]} == {(NOW + 2, "superseded"), (NOW + 3, "superseded")}
    single = make_ledger(max_valid=1)
    a = enroll(single, pki, "dev-9")
    b = enroll(single, pki, "dev-9", NOW + 1)
    assert state(single, a, NOW + 1) == (NOW + 1, "superseded") and state(single, b, NOW + 1) is None


def test_a_certificate_superseded_by_its_grace_period_is_not_counted_again_by_the_cap(
        make_ledger: Callable[..., Ledger], pki: Pki) -> None:
    """The cap counts what `Row.revocation` counts as valid: a predecessor whose grace period ended is
    superseded since then (not swept yet on the password path), and keeps that time."""
    ledger = make_ledger(max_valid=2)
    first = enroll(ledger, pki, "dev-1")
    second = enroll(ledger, pki, "dev-1", NOW + 10, predecessor=first)
    later = NOW + 10 + GRACE + 5
    ledger.add_otp("dev-1", "digest-1", later, later + 60)
    third, reused = ledger.issue_with_otp("dev-1", "digest-1", "csr-third", later, signer(pki, "dev-1"))
    assert not reused
    assert state(ledger, first, later) == (NOW + 10 + GRACE, "superseded")
    assert state(ledger, second, later) is None and state(ledger, third.serial, later) is None


def test_revoke_device_revokes_all_of_its_certificates(make_ledger: Callable[..., Ledger], pki: Pki) -> None:
    ledger = make_ledger()
    a = enroll(ledger, pki, "dev-1")
    b = enroll(ledger, pki, "dev-1", NOW + 1, predecessor=a)
    c = enroll(ledger, pki, "dev-2")
    revoked = ledger.revoke_device("dev-1", NOW + 5, "cessationOfOperation")
    assert {r.serial for r in revoked} == {a, b}
    assert state(ledger, c, NOW + 5) is None
    with pytest.raises(StationError, match="already revoked"):
        ledger.revoke_device("dev-1", NOW + 6)
    with pytest.raises(StationError, match="no certificates"):
        ledger.revoke_device("dev-404", NOW + 6)
    with pytest.raises(StationError, match="revocation reason"):
        ledger.revoke(c, NOW + 6, "because")
    assert state(ledger, c, NOW + 6) is None


OLD_SCHEMA = """
CREATE TABLE certs (serial TEXT PRIMARY KEY, device_id TEXT NOT NULL, subject TEXT NOT NULL, kind TEXT NOT NULL,
    not_before BIGINT NOT NULL, not_after BIGINT NOT NULL, csr_fingerprint TEXT NOT NULL, issued_at BIGINT NOT NULL,
    revoked_at BIGINT, cert_der {blob} NOT NULL);
CREATE TABLE otps (digest TEXT PRIMARY KEY, device_id TEXT NOT NULL, created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL, used_at BIGINT, csr_fingerprint TEXT, serial TEXT REFERENCES certs (serial));
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_ledger_from_before_lineage_is_migrated_and_keeps_its_rows(backend: str, tmp_path: Path, pki: Pki,
                                                                     request: pytest.FixtureRequest) -> None:
    cert = signer(pki, "old-dev")()
    from cryptography.hazmat.primitives.serialization import Encoding

    values = (f"{cert.serial_number:x}", "old-dev", "CN=old-dev", "device", NOW - 10, NOW + 10**6, "fp", NOW - 10,
              None, cert.public_bytes(Encoding.DER))
    if backend == "sqlite":
        location = str(tmp_path / "old.sqlite")
        with sqlite3.connect(location) as conn:
            conn.executescript(OLD_SCHEMA.format(blob="BLOB"))
            conn.execute("INSERT INTO certs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
    else:
        import psycopg

        location = request.getfixturevalue("postgres")
        with psycopg.connect(location, autocommit=True) as conn:
            for statement in OLD_SCHEMA.format(blob="BYTEA").split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO certs VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", values)
    ledger = Ledger(location)
    try:
        (old,) = ledger.rows()
        assert (old.serial, old.predecessor, old.revocation(NOW)) == (values[0], None, None)
        new = enroll(ledger, pki, "old-dev", NOW, predecessor=old.serial)
        assert {r.serial for r in ledger.revoke(old.serial, NOW + 1)} == {old.serial, new}
    finally:
        ledger.close()
    Ledger(location).close()  # opening a migrated ledger again changes nothing


def test_a_revoked_device_is_barred_from_the_bootstrap_path_and_its_older_passwords_are_void(
        make_ledger: Callable[..., Ledger], pki: Pki) -> None:
    ledger = make_ledger()
    first, reused = ledger.issue_with_bootstrap("dev-1", "fp-a", NOW, signer(pki, "dev-1"))
    assert not reused
    retry, reused = ledger.issue_with_bootstrap("dev-1", "fp-a", NOW + 1, signer(pki, "dev-1"))
    assert reused and retry.serial == first.serial  # a crash-retry gets the same certificate
    ledger.add_otp("dev-1", "spare", NOW + 2, NOW + 10**6)
    ledger.add_otp("dev-2", "other", NOW + 2, NOW + 10**6)

    ledger.revoke_device("dev-1", NOW + 5, "keyCompromise")
    assert ledger.bars() == [Bar("dev-1", NOW + 5, "keyCompromise")]
    for fingerprint in ("fp-a", "fp-b"):  # the crash-retry and a fresh key: neither is answered
        with pytest.raises(Refusal, match=r"device 'dev-1' was revoked \(keyCompromise\)") as refused:
            ledger.issue_with_bootstrap("dev-1", fingerprint, NOW + 6, signer(pki, "dev-1"))
        assert refused.value.status == 403
    with pytest.raises(Refusal, match="issued before the device was revoked") as void:
        ledger.issue_with_otp("dev-1", "spare", "fp-c", NOW + 6, signer(pki, "dev-1"))
    assert void.value.status == 403
    assert [r.serial for r in ledger.rows("device")] == [first.serial]
    # another device's password is untouched; a password issued after the revocation admits dev-1
    assert not ledger.issue_with_otp("dev-2", "other", "fp-d", NOW + 6, signer(pki, "dev-2"))[1]
    ledger.add_otp("dev-1", "fresh", NOW + 7, NOW + 10**6)
    assert not ledger.issue_with_otp("dev-1", "fresh", "fp-e", NOW + 7, signer(pki, "dev-1"))[1]
    with pytest.raises(Refusal, match="was revoked"):  # the bootstrap path stays shut
        ledger.issue_with_bootstrap("dev-1", "fp-f", NOW + 8, signer(pki, "dev-1"))

    assert ledger.readmit("dev-1") == Bar("dev-1", NOW + 5, "keyCompromise")
    assert ledger.bar("dev-1") is None
    assert not ledger.issue_with_bootstrap("dev-1", "fp-f", NOW + 9, signer(pki, "dev-1"))[1]
    with pytest.raises(StationError, match="device 'dev-1' is not barred"):
        ledger.readmit("dev-1")


def test_a_ledger_from_before_bars_bars_the_devices_an_operator_revoked(make_ledger: Callable[..., Ledger],
                                                                       pki: Pki) -> None:
    ledger = make_ledger(max_valid=1)
    stolen = enroll(ledger, pki, "stolen")
    enroll(ledger, pki, "renewed")
    enroll(ledger, pki, "renewed", NOW + 1)  # the first is superseded: no operator revoked anything
    gone = enroll(ledger, pki, "back")
    enroll(ledger, pki, "back", NOW + 20)  # revoked at NOW + 10, enrolled again since
    ledger.add_otp("stolen", "spare", NOW, NOW + 10**6)
    with ledger.db.transaction() as q:  # what an older station's `revoke` left: revoked rows, no bars
        q("UPDATE certs SET revoked_at = ?, revoke_reason = ? WHERE serial = ?", (NOW + 10, "keyCompromise", stolen))
        q("UPDATE certs SET revoked_at = ?, revoke_reason = NULL WHERE serial = ?", (NOW + 10, gone))
        q("DROP TABLE device_bars", ())
        q("UPDATE otps SET voided_at = NULL", ())
    ledger.close()

    reopened = make_ledger()
    assert reopened.bars() == [Bar("stolen", NOW + 10, "keyCompromise")]
    with pytest.raises(Refusal, match="issued before the device was revoked"):
        reopened.issue_with_otp("stolen", "spare", "fp", NOW + 30, signer(pki, "stolen"))
    reopened.readmit("stolen")
    assert make_ledger().bars() == []  # bars are made once, when the table is new: a readmit holds
