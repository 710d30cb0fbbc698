"""The station's Prometheus metrics (issue 28 item 3), scraped from a real `tether-station serve --metrics`
with prometheus-client's own text parser while real devices enroll, retry, guess wrong and get refused."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hal.keys.file import generate
from lab.procs import wait_until
from provisioning import EnrollmentError
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, ClientCertAuth, EstClient
from provisioning.station.errors import Refusal, StationError
from provisioning.station.metrics import is_ledger_error, ledger_gauges, method_of, reason_of
from provisioning.station.supervisor import RestartBudget
from tests.pki import TRUST_DOMAIN, key_pem
from tests.security.stationbed import set_settings
from tests.station.conftest import RunningStation, serve_station, station_cli

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def metered(station_dir: Path) -> Iterator[tuple[RunningStation, int]]:
    set_settings(station_dir, otp_failure_burst=1000)  # no rate limit in the way of the test's wrong guesses
    argv = ["--workers", "2", "--log-level", "info", "--metrics", "127.0.0.1:0"]
    proc, ports = serve_station(station_dir, argv)
    running = RunningStation(station_dir, ports["est"], proc, None, argv)
    try:
        wait_until(running.serving, 20, "tether-station serve", describe=lambda: proc.tail())
        yield running, ports["metrics"]
    finally:
        proc.stop()


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_counters_and_gauges_move_with_real_enrollments_and_refusals(tmp_path: Path,
                                                                    metered: tuple[RunningStation, int]) -> None:
    station, port = metered
    before = scrape(port)
    assert value(before, "tether_station_ledger_up") == 1
    otp = station.otp("metric-dev")
    station.otp("waiting-dev")  # stays open
    assert delta(before, scrape(port), "tether_station_otps", state="open") == 2

    key = generate("ec-p256")
    csr = build_csr(key, "metric-dev", TRUST_DOMAIN)
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("metric-dev", otp)) as c:
        chain = c.simpleenroll(csr)
        c.simpleenroll(csr)  # a retry: the same certificate
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("waiting-dev", "wrong-password")) as c, \
            pytest.raises(EnrollmentError) as wrong:
        c.simpleenroll(build_csr(generate("ec-p256"), "waiting-dev", TRUST_DOMAIN))
    assert wrong.value.status == 401
    # a revoked device that tries to renew: refused 403
    from provisioning.certs import to_pem

    cert_file, key_file = tmp_path / "dev.pem", tmp_path / "dev.key"
    cert_file.write_bytes(to_pem(chain))
    key_file.write_bytes(key_pem(key))
    station.cli("revoke", "--device", "metric-dev")
    with EstClient(station.url, str(station.ca_file), auth=ClientCertAuth(str(cert_file), str(key_file))) as c, \
            pytest.raises(EnrollmentError) as revoked:
        c.simplereenroll(build_csr(key, "metric-dev", TRUST_DOMAIN))
    assert revoked.value.status == 403

    after = scrape(port)
    enrollments = "tether_station_enrollments_total"
    assert delta(before, after, enrollments, method="otp", outcome="issued") == 1
    assert delta(before, after, enrollments, method="otp", outcome="retry") == 1
    assert delta(before, after, enrollments, method="otp", outcome="refused") == 1
    assert delta(before, after, enrollments, method="reenroll", outcome="refused") == 1
    assert delta(before, after, "tether_station_refusals_total", reason="unauthenticated") == 1
    assert delta(before, after, "tether_station_refusals_total", reason="forbidden") == 1
    # the latency histogram saw the two answers that carried a certificate, in its +Inf bucket and count
    assert delta(before, after, "tether_station_enrollment_seconds_count", method="otp") == 2
    assert delta(before, after, "tether_station_enrollment_seconds_bucket", method="otp", le="+Inf") == 2
    assert value(after, "tether_station_enrollment_seconds_sum", method="otp") > 0
    assert value(after, "tether_station_otps", state="open") == 1  # waiting-dev's; metric-dev's was used
    assert value(after, "tether_station_certificates", kind="device", state="revoked") == 1
    assert value(after, "tether_station_barred_devices") == 1
    assert value(after, "tether_station_certificates", kind="device", state="valid") == 0


def test_voided_and_expired_otps_barred_devices_and_expiring_certificates_show_in_the_gauges(
        metered: tuple[RunningStation, int]) -> None:
    station, port = metered
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("gone-dev", station.otp("gone-dev"))) as c:
        c.simpleenroll(build_csr(generate("ec-p256"), "gone-dev", TRUST_DOMAIN))
    station.otp("gone-dev")  # a second password, unused when the device is revoked: voided
    station.cli("revoke", "--device", "gone-dev")
    station.otp("open-dev")
    station.cli("issue", "short-dev", "--days", "3", "--out", str(station.directory / "short"))
    samples = scrape(port)
    assert value(samples, "tether_station_otps", state="voided") == 1
    assert value(samples, "tether_station_otps", state="open") == 1
    assert value(samples, "tether_station_barred_devices") == 1
    assert value(samples, "tether_station_certificates", kind="device", state="expiring") == 1
    assert value(samples, "tether_station_certificates", kind="device", state="valid") == 1
    assert value(samples, "tether_station_certificates", kind="device", state="revoked") == 1
    # two days on (the clock is the function's input): open-dev's password (1 day) has expired
    ledger = station.ledger()
    try:
        later = ledger_gauges(ledger, int(time.time()) + 2 * 86400, 30)
    finally:
        ledger.close()
    assert later[("otps", (("state", "expired"),))] == 1 and later[("otps", (("state", "open"),))] == 0


def children_listening_on(station: RunningStation, port: int) -> list[int]:
    """The serve process' children that hold the listening socket of `port` (EST workers share theirs; the
    console and metrics processes close it and hold their own)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    pid = station.proc.popen.pid
    found = []
    for child in map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()):
        with contextlib.suppress(FileNotFoundError):  # a child that just exited
            links = {os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir()}
            if any(f"socket:[{inode}]" in links for inode in inodes):
                found.append(child)
    return found


def test_a_killed_worker_is_restarted_counted_and_enrollment_goes_on(metered: tuple[RunningStation, int]) -> None:
    station, port = metered
    workers = children_listening_on(station, station.port)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: value(scrape(port), "tether_station_worker_restarts_total", role="est") == 1, 20,
               "the restart counted", describe=lambda: station.proc.tail())
    wait_until(lambda: len(children_listening_on(station, station.port)) == 2, 20, "two EST workers again",
               describe=lambda: station.proc.tail())
    assert workers[0] not in children_listening_on(station, station.port)
    assert "restarted as" in station.proc.tail()
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("after-dev", station.otp("after-dev"))) as c:
        c.simpleenroll(build_csr(generate("ec-p256"), "after-dev", TRUST_DOMAIN))
    assert value(scrape(port), "tether_station_enrollments_total", method="otp", outcome="issued") == 1


def test_a_dead_side_process_stays_off_and_est_goes_on(metered: tuple[RunningStation, int]) -> None:
    station, port = metered
    (metrics,) = children_listening_on(station, port)
    os.kill(metrics, signal.SIGKILL)
    wait_until(lambda: "metrics process" in station.proc.tail(), 20, "the metrics process' death logged",
               describe=lambda: station.proc.tail())
    assert f"metrics process {metrics} exited with -9; it stays off, EST enrollment goes on" in station.proc.tail()
    assert station.proc.alive() and station.serving()
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("on-dev", station.otp("on-dev"))) as c:
        c.simpleenroll(build_csr(generate("ec-p256"), "on-dev", TRUST_DOMAIN))
    assert len(children_listening_on(station, station.port)) == 2


def test_metrics_off_loopback_are_refused_in_one_line(station_dir: Path) -> None:
    out = station_cli("serve", "--dir", str(station_dir), "--listen", "127.0.0.1:0", "--metrics", "0.0.0.0:9464",
                      check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "tether-station: error: --metrics '0.0.0.0:9464': metrics are served on loopback only (plain HTTP, no "
        "client certificates); scrape through a local Prometheus agent or an SSH tunnel"]


def test_restart_budget_allows_five_restarts_a_minute() -> None:
    budget = RestartBudget(limit=5, window=60.0)
    assert budget.allows([], 0.0)
    assert budget.allows([1.0, 2.0, 3.0, 4.0], 5.0)
    assert not budget.allows([1.0, 2.0, 3.0, 4.0, 5.0], 6.0)
    assert budget.allows([1.0, 2.0, 3.0, 4.0, 5.0], 61.5)  # the first fell out of the window


def test_a_ledger_that_cannot_answer_shows_as_ledger_up_zero_and_a_counted_error(
        metered: tuple[RunningStation, int]) -> None:
    station, port = metered
    assert value(scrape(port), "tether_station_ledger_up") == 1
    with sqlite3.connect(station.directory / "ledger.sqlite") as db:  # a table the gauges read goes missing
        db.execute("ALTER TABLE device_bars RENAME TO device_bars_gone")
    samples = scrape(port)  # the scrape itself still answers 200
    assert value(samples, "tether_station_ledger_up") == 0
    assert value(samples, "tether_station_ledger_errors_total", where="scrape") == 1
    assert "metrics: the ledger did not answer" in station.proc.tail()


def test_labels_are_a_fixed_set() -> None:
    from provisioning.station.enrollment import ENROLL, REENROLL, Request

    assert method_of(Request(REENROLL, "", b"", basic=("d", "p"))) == "reenroll"
    assert method_of(Request(ENROLL, "", b"", basic=("d", "p"))) == "otp"
    assert method_of(Request(ENROLL, "", b"", peer_der=b"x")) == "bootstrap"
    assert method_of(Request(ENROLL, "", b"")) == "none"
    assert [reason_of(Refusal(s, "any words")) for s in (400, 401, 403, 415, 429, 503, 418)] == [
        "malformed_csr", "unauthenticated", "forbidden", "wrong_content_type", "rate_limited", "unavailable",
        "status_418"]
    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.Error as exc:
            raise StationError("ledger write failed") from exc
    except StationError as wrapped:
        assert is_ledger_error(wrapped)
    assert not is_ledger_error(ValueError("a bug, not the ledger"))


def test_an_enrollment_the_ledger_fails_counts_as_an_error_and_a_ledger_error(
        metered: tuple[RunningStation, int]) -> None:
    station, port = metered
    otp = station.otp("unlucky-dev")
    with sqlite3.connect(station.directory / "ledger.sqlite") as db:  # the issuance table goes missing
        db.execute("ALTER TABLE certs RENAME TO certs_gone")
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("unlucky-dev", otp)) as c, \
            pytest.raises(EnrollmentError) as failed:
        c.simpleenroll(build_csr(generate("ec-p256"), "unlucky-dev", TRUST_DOMAIN))
    assert failed.value.status == 500
    samples = scrape(port)
    assert value(samples, "tether_station_enrollments_total", method="otp", outcome="error") == 1
    assert value(samples, "tether_station_ledger_errors_total", where="enrollment") == 1
