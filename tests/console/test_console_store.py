"""The console's tables and queries on both ledgers (SQLite and a real PostgreSQL), and the role check
on a POST that carries a valid CSRF token, called in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioning.station import refusals
from provisioning.station.ca import Station, init_station
from provisioning.station.console.batches import expand
from provisioning.station.console.security import Caller, Denied
from provisioning.station.console.store import ADMIN, READ, REFUSED, ConsoleStore
from provisioning.station.console.web import Console
from provisioning.station.errors import StationError
from tests.pki import TRUST_DOMAIN


def _exercise(station: Station, db: str | None) -> None:
    ledger = station.open_ledger(db)
    try:
        store = ConsoleStore(ledger)
        ConsoleStore(ledger)  # idempotent: a second start finds its tables
        store.add_operator("ab12", "eve", "admin", 100, 10**10, b"der")
        store.audit("eve", "export", "crl.pem", "127.0.0.1", READ, now=150)
        assert [(a.who, a.action, a.detail, a.at, a.kind) for a in store.audit_log().entries] == \
            [("eve", "export", "crl.pem", 150, READ)]
        batch = store.create_batch("d-{1..3}", ["d-1", "d-2", "d-3"], 200, 10**10, "eve")
        store.add_batch_otps(batch, [("d-1", "aa" * 32), ("d-2", "bb" * 32)], 200, 10**10)
        got = store.batch(batch)
        assert got is not None and (got.made, got.total, got.done, got.enrolled) == (2, 3, False, 0)
        refusals.record_refusal(ledger, 300, "simpleenroll", "d-9", 401, "one-time password is not valid", "10.0.0.1")
        live = store.live(0)
        assert [(e.device_id, e.status) for e in live if e.device_id == "d-9"] == [("d-9", 401)]
        assert store.counters(320)["otp_failures"] == 1 and store.counters(320)["refused_per_min"] == 1
        assert store.search(prefix="d-") == []
        assert store.revoke_operator("eve", 400)[0].serial == "ab12"
        with pytest.raises(StationError, match="holds no unrevoked console certificate"):
            store.revoke_operator("eve", 401)
    finally:
        ledger.close()


def test_console_tables_work_on_sqlite(tmp_path: Path) -> None:
    _exercise(init_station(tmp_path / "st", TRUST_DOMAIN), None)


def test_console_tables_work_on_postgresql(tmp_path: Path, postgres: str) -> None:
    _exercise(init_station(tmp_path / "st", TRUST_DOMAIN, ledger=postgres), postgres)


def test_readonly_post_with_a_valid_csrf_token_is_refused_by_role(tmp_path: Path) -> None:
    station = init_station(tmp_path / "st", TRUST_DOMAIN)
    ledger = station.open_ledger()
    try:
        store = ConsoleStore(ledger)
        store.add_operator("cd34", "ro", "readonly", 0, 10**10, b"der")
        ro = store.operator("cd34")
        assert ro is not None
        console = Console(station, store)
        caller = Caller(ro, "127.0.0.1")
        for path, form in (("/batches", {"pattern": "x-{1..2}"}), ("/devices/x/revoke", {})):
            with pytest.raises(Denied, match="needs the admin role") as refused:
                console.handle(caller, "POST", path, {**form, "csrf": console.csrf.token(caller, path)})
            assert refused.value.status == 403
        assert store.batches() == []
    finally:
        ledger.close()


def test_batch_patterns_keep_the_width_of_the_first_number() -> None:
    assert expand("pump-{0001..0003}") == ["pump-0001", "pump-0002", "pump-0003"]
    assert expand("a{8..10}b") == ["a8b", "a9b", "a10b"]


def test_audit_retention_prunes_reads_and_refusals_but_never_admin_actions(tmp_path: Path) -> None:
    station = init_station(tmp_path / "st", TRUST_DOMAIN)
    ledger = station.open_ledger()
    try:
        store = ConsoleStore(ledger, audit_keep=50)
        store.audit("cli root@line", "operator add", "alice (admin)", "cli", ADMIN, now=1)
        for i in range(2100):  # a revoked operator knocking, and exports
            store.audit("mallory (admin, serial 1)", "GET /live", "revoked", "10.0.0.9", REFUSED if i % 2 else READ,
                        now=2 + i)
        admin = store.audit_log(ADMIN).entries
        assert [(a.action, a.detail) for a in admin] == [("operator add", "alice (admin)")]
        everything = store.audit_log(limit=10_000).entries
        # pruned at rows 1000 and 2000 down to the newest 50; what came after is kept until the next prune
        assert len(everything) == 1 + 50 + 101 and everything[-1].kind == ADMIN
        assert everything[0].at == 2 + 2099
    finally:
        ledger.close()


def test_an_audit_table_from_before_kinds_is_classified_when_opened(tmp_path: Path) -> None:
    station = init_station(tmp_path / "st", TRUST_DOMAIN)
    ledger = station.open_ledger()
    try:
        with ledger.db.transaction() as q:
            q("DROP TABLE console_audit", ())
            q("CREATE TABLE console_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at BIGINT NOT NULL, "
              "who TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL, address TEXT NOT NULL, "
              "outcome TEXT NOT NULL)", ())
            for action, outcome in (("revoke", "ok"), ("export", "ok"), ("GET /live", "refused"),
                                    ("batch csv", "refused"), ("operator revoke", "ok")):
                q("INSERT INTO console_audit (at, who, action, detail, address, outcome) VALUES (1, 'eve', ?, '', "
                  "'127.0.0.1', ?)", (action, outcome))
        ledger.close()
        ledger = station.open_ledger()  # the station starts again: the schema classifies the old rows
        store = ConsoleStore(ledger)
        kinds = {(a.action, a.outcome): a.kind for a in store.audit_log().entries}
        assert kinds == {("revoke", "ok"): ADMIN, ("export", "ok"): READ, ("GET /live", "refused"): REFUSED,
                         ("batch csv", "refused"): REFUSED, ("operator revoke", "ok"): ADMIN}
    finally:
        ledger.close()


def test_audit_pages_filter_by_operator_and_kind_on_sqlite(tmp_path: Path) -> None:
    _audit_pages(init_station(tmp_path / "st", TRUST_DOMAIN), None)


def test_audit_pages_filter_by_operator_and_kind_on_postgresql(tmp_path: Path, postgres: str) -> None:
    _audit_pages(init_station(tmp_path / "st", TRUST_DOMAIN, ledger=postgres), postgres)


def _audit_pages(station: Station, db: str | None) -> None:
    ledger = station.open_ledger(db)
    try:
        store = ConsoleStore(ledger, audit_keep=3)
        for i in range(5):
            store.audit("alice (admin, serial ab)", "revoke", f"d-{i}", "127.0.0.1", ADMIN, now=i)
            store.audit("alicia (readonly, serial cd)", "export", f"e-{i}", "127.0.0.1", READ, now=i)
        store.audit("cli root@line", "operator add", "bob", "cli", ADMIN, now=9)
        first = store.audit_log(ADMIN, "alice", limit=2)
        assert [a.detail for a in first.entries] == ["d-4", "d-3"] and first.older is not None
        second = store.audit_log(ADMIN, "alice", first.older, limit=2)
        last = store.audit_log(ADMIN, "alice", second.older, limit=2)
        assert [a.detail for a in second.entries + last.entries] == ["d-2", "d-1", "d-0"] and last.older is None
        assert {a.detail for a in store.audit_log(operator="alicia").entries} == {f"e-{i}" for i in range(5)}
        assert [a.detail for a in store.audit_log(operator="cli").entries] == ["bob"]
        with pytest.raises(StationError, match="kind 'nope': expected one of admin, read, refused"):
            store.audit_log("nope")
        with pytest.raises(StationError, match="audit kind 'nope'"):
            store.audit("x", "y", "z", "127.0.0.1", "nope")
        assert len(store.audit_log(limit=100).entries) == 11
        station.open_ledger(db).close()  # a second start classifies nothing twice
        with ledger.db.transaction() as q:
            store._prune_audit(q)  # keeps the newest 3 exports and every admin row
        assert [a.detail for a in store.audit_log(READ).entries] == ["e-4", "e-3", "e-2"]
        assert len(store.audit_log(ADMIN).entries) == 6
    finally:
        ledger.close()
