"""Issue 22 case 6: refused requests cannot fill the ledger. From each address the first refusals of a
window are written one by one and the rest become one summary row per status when the window closes;
the table keeps rows for `events_max_age` seconds and at most `events_max_rows` of them. In-process with
a clock the test moves (SQLite and a real PostgreSQL), then against a real `tether-station serve`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.procs import wait_until
from provisioning.station.ca import Station
from provisioning.station.console.store import ConsoleStore
from provisioning.station.errors import StationError
from provisioning.station.ledger import Ledger
from provisioning.station.refusals import OTHERS, RefusalRecorder
from tests.security.stationbed import Client, post_enroll, set_settings
from tests.station.conftest import RunningStation, start_station

T0 = 1_800_000_000.0
Event = tuple[str, str, int, str, int]  # address, device id, status, reason, refusals


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    location = str(tmp_path / "ledger.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres")
    opened = Ledger(location)
    try:
        yield opened
    finally:
        opened.close()


def rows(ledger: Ledger, address: str | None = None) -> list[Event]:
    with ledger.db.transaction(write=False) as q:
        found = q("SELECT address, device_id, status, reason, refusals FROM est_events ORDER BY id", ())
    return [(a, d, int(s), r, int(n)) for a, d, s, r, n in found if address is None or a == address]


def recorder(ledger: Ledger, now: list[float], **kw: int) -> RefusalRecorder:
    settings = {"per_address": 3, "window": 60, "max_age": 10**6, "max_rows": 10**6, **kw}
    return RefusalRecorder(ledger, clock=lambda: now[0], **settings)


def test_a_flood_from_one_address_writes_its_first_refusals_and_one_summary_per_status(ledger: Ledger) -> None:
    now = [T0]
    record = recorder(ledger, now)
    for i in range(1000):
        record.record("simpleenroll", f"d-{i % 7}", 401 if i % 2 else 400, f"reason {i}", "10.0.0.1")
    record.record("simpleenroll", "d-x", 401, "another address", "10.0.0.2")
    assert [e[3] for e in rows(ledger)] == ["reason 0", "reason 1", "reason 2", "another address"]

    now[0] += 59
    assert record.flush() == [] and len(rows(ledger)) == 4  # the window is still open
    now[0] += 1
    written = record.flush()
    assert [(s.address, s.status, s.count) for s in written] == [("10.0.0.1", 400, 498), ("10.0.0.1", 401, 499)]
    summaries = [e for e in rows(ledger, "10.0.0.1") if e[4] > 1]
    assert [(e[1], e[2], e[4]) for e in summaries] == [("*", 400, 498), ("*", 401, 499)]
    assert "498 more refusals (400) from 10.0.0.1 within 60 s" in summaries[0][3]
    assert "the first said: reason 4" in summaries[0][3] and "d-4, d-6, d-1, d-3, d-5 and 2 more" in summaries[0][3]
    assert sum(e[4] for e in rows(ledger, "10.0.0.1")) == 1000
    # the console counts what a summary stands for
    assert ConsoleStore(ledger).counters(int(now[0]))["refused_per_min"] == 1001

    # the next window starts over: its first refusals are written one by one again
    record.record("simplereenroll", "d-1", 403, "next window", "10.0.0.1")
    assert rows(ledger)[-1][3] == "next window"


def test_addresses_beyond_the_table_share_one_window(ledger: Ledger) -> None:
    now = [T0]
    record = recorder(ledger, now, per_address=2, max_addresses=4)
    for n in range(10):
        for _ in range(5):
            record.record("simpleenroll", f"d-{n}", 401, "wrong", f"10.0.1.{n}")
    record.flush(everything=True)  # what a stopping worker does
    written = rows(ledger)
    assert len(written) == 5 * (2 + 1)  # 4 addresses and the shared window: 2 rows and a summary each
    assert sum(e[4] for e in written) == 50
    assert [e[4] for e in written if e[0] == OTHERS] == [28]  # 6 addresses x 5, less the 2 written


def test_old_rows_and_rows_beyond_the_cap_are_pruned_oldest_first(ledger: Ledger) -> None:
    now = [T0]
    with ledger.db.transaction() as q:
        for i in range(1200):
            at = int(T0) - 40 * 86400 if i < 700 else int(T0) - 60 + i % 60
            q("INSERT INTO est_events (at, operation, device_id, status, reason, address) VALUES (?, ?, ?, ?, ?, ?)",
              (at, "simpleenroll", "d", 401, f"row {i}", "10.0.0.1"))
    assert recorder(ledger, now, max_age=30 * 86400, max_rows=10**6).prune() == 700  # older than 30 days
    assert [e[3] for e in rows(ledger)] == [f"row {i}" for i in range(700, 1200)]
    assert recorder(ledger, now, max_age=30 * 86400, max_rows=300).prune() == 200  # beyond the newest 300
    assert [e[3] for e in rows(ledger)] == [f"row {i}" for i in range(900, 1200)]


def test_a_flood_against_a_real_station_writes_a_bounded_number_of_rows_and_a_summary(
        station_dir: Path) -> None:
    # The window outlasts the test however slow the machine is: the summary is written by the worker as
    # it stops (what a stopping station does with every open window), not by a window that happens to
    # close while the flood is still going. Window expiry itself is the fake-clock test above.
    set_settings(station_dir, events_per_address=5, events_window=3600)
    station = start_station(station_dir, workers=1)
    try:
        with Client(station, "127.0.0.9") as flood:
            for _ in range(300):  # no credentials at all: refused 401 before any other work
                assert flood.post(b"x", {}).status == 401
        # issuance is not held up by the flood
        assert post_enroll(station, "pump-1", station.otp("pump-1"), source="127.0.0.10").status == 200
        ledger = station.ledger()
        try:
            assert [e[4] for e in rows(ledger, "127.0.0.9")] == [1, 1, 1, 1, 1]  # the first five, one by one
        finally:
            ledger.close()
    finally:
        station.proc.stop(timeout=120)
    ledger = Ledger(station_dir / "ledger.sqlite")
    try:
        flood_rows = rows(ledger, "127.0.0.9")
    finally:
        ledger.close()
    assert [e[4] for e in flood_rows] == [1, 1, 1, 1, 1, 295], flood_rows
    assert "295 more refusals (401) from 127.0.0.9" in flood_rows[-1][3]


def test_a_real_station_prunes_old_refusal_records(station_dir: Path) -> None:
    set_settings(station_dir, events_max_age=3600, events_max_rows=1000)
    ledger = Ledger(station_dir / "ledger.sqlite")
    now = int(time.time())
    try:
        with ledger.db.transaction() as q:
            for i in range(3000):  # 2,000 from last month, 1,000 from the last minutes
                q("INSERT INTO est_events (at, operation, device_id, status, reason, address) VALUES "
                  "(?, ?, ?, ?, ?, ?)", (now - 30 * 86400 if i < 2000 else now - 60, "simpleenroll", "d", 401,
                                         f"row {i}", "10.0.0.1"))
        station: RunningStation = start_station(station_dir, workers=1)
        try:
            wait_until(lambda: len(rows(ledger)) <= 1000, 20, "the station to prune refusal records",
                       describe=lambda: f"{len(rows(ledger))} rows; serve.log ends:\n{station.proc.tail()}")
            assert [e[3] for e in rows(ledger)] == [f"row {i}" for i in range(2000, 3000)]
            assert "deleted 2000 refusal records beyond the retention" in (station_dir / "serve.log").read_text()
        finally:
            station.proc.stop()
    finally:
        ledger.close()


@pytest.mark.parametrize("key", ["events_per_address", "events_window", "events_max_age", "events_max_rows"])
def test_a_bound_below_1_is_refused_naming_the_setting(station_dir: Path, key: str) -> None:
    set_settings(station_dir, **{key: 0})
    with pytest.raises(StationError, match=rf"station.toml: {key} must be at least 1, got 0$"):
        Station(station_dir)


def test_an_events_table_from_before_summaries_gains_the_refusals_column(ledger: Ledger) -> None:
    serial = "BIGSERIAL PRIMARY KEY" if ledger.is_postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
    with ledger.db.transaction() as q:  # the table as the console's first release made it
        q("DROP TABLE est_events", ())
        q(f"CREATE TABLE est_events (id {serial}, at BIGINT NOT NULL, operation TEXT NOT NULL, "
          "device_id TEXT NOT NULL, status INTEGER NOT NULL, reason TEXT NOT NULL, address TEXT NOT NULL)", ())
        q("INSERT INTO est_events (at, operation, device_id, status, reason, address) VALUES (?, ?, ?, ?, ?, ?)",
          (int(T0), "simpleenroll", "old", 401, "before", "10.0.0.1"))
    ledger.close()
    ledger = Ledger(ledger.location)  # the station starts again: the schema migrates the table
    now = [T0]
    record = recorder(ledger, now, per_address=1)
    for _ in range(3):
        record.record("simpleenroll", "new", 401, "after", "10.0.0.2")
    record.flush(everything=True)
    assert [(e[1], e[4]) for e in rows(ledger)] == [("old", 1), ("new", 1), ("new", 2)]
