"""The console driven in real headless Chromium, logged in with operator certificates; devices enroll
against the same station with the real agent (`tether enroll`) and the EST client. Each page's
screenshot lands in docs/console/ (docs/console.md shows them)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from hal.keys.file import generate
from provisioning import EnrollmentError
from provisioning.certs import to_pem
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, ClientCertAuth, EstClient
from tests.conftest import run_tether, write_config
from tests.console.conftest import ConsoleStation, Operator, screenshot
from tests.pki import TRUST_DOMAIN, key_pem

WAIT = 60  # seconds: a deadline for what the page shows, not a pause


def wait_for(driver: Any, what: str, predicate: Any) -> Any:
    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(predicate, f"waited {WAIT} s for {what}")


def rows_with(text: str) -> Any:
    return lambda d: [r for r in d.find_elements(By.CSS_SELECTOR, "#live tbody tr") if text in r.text]


def text_of(driver: Any, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def device_config(tmp_path: Path, station: ConsoleStation, device_id: str) -> Path:
    otp_file = tmp_path / device_id / "otp"
    otp_file.parent.mkdir(parents=True)
    otp_file.write_text(station.otp(device_id) + "\n")
    return write_config(tmp_path / device_id, device_id,
                        est={"url": station.url, "ca_file": str(station.ca_file), "otp_file": str(otp_file)},
                        identity={"ca_file": str(station.ca_file)}, keys={"backend": "file"})


def enrolled(station: ConsoleStation, tmp_path: Path, device_id: str) -> tuple[Path, Path, Any]:
    key = generate("ec-p256")
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth(device_id, station.otp(device_id))) as c:
        chain = c.simpleenroll(build_csr(key, device_id, TRUST_DOMAIN))
    cert_file, key_file = tmp_path / f"{device_id}.pem", tmp_path / f"{device_id}.key"
    cert_file.write_bytes(to_pem(chain))
    key_file.write_bytes(key_pem(key))
    return cert_file, key_file, key


def test_operator_logs_in_and_watches_live_enrollments_and_refusals_appear(
        tmp_path: Path, console_station: ConsoleStation, admin: Operator, browser: Any) -> None:
    driver = browser(admin)
    driver.get(console_station.console_url + "/live")
    assert "alice · admin" in text_of(driver, "#me")
    wait_for(driver, "the live stream to connect", lambda d: text_of(d, "#stream-state") == "live")

    # a device enrolls through the real agent while the page is open, and another one mistypes its password
    config = device_config(tmp_path, console_station, "live-dev-1")
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", run_tether("enroll", config=config)))
    worker.start()
    with EstClient(console_station.url, str(console_station.ca_file), auth=BasicAuth("live-dev-2", "wrong")) as c, \
            pytest.raises(EnrollmentError):
        c.simpleenroll(build_csr(generate("ec-p256"), "live-dev-2", TRUST_DOMAIN))
    worker.join(90)
    assert result["out"].returncode == 0, result["out"].stderr
    (row,) = console_station.rows("live-dev-1")

    issued = wait_for(driver, "the enrollment of live-dev-1 on the page",
                      rows_with("live-dev-1"))
    assert "first boot" in issued[0].text and "issued" in issued[0].text and row.serial in issued[0].text
    refused = wait_for(driver, "the refusal of live-dev-2 on the page",
                       rows_with("live-dev-2"))
    assert "refused 401" in refused[0].text and "one-time password is not valid" in refused[0].text
    wait_for(driver, "the counters", lambda d: int(text_of(d, "#otp_failures")) >= 1
             and int(text_of(d, "#issued_per_min")) >= 1)
    assert driver.execute_script("return window.location.pathname") == "/live", "the page never reloaded"
    screenshot(driver, "live")


def test_search_then_revoke_a_device_with_confirmation_and_it_is_refused_afterwards(
        tmp_path: Path, console_station: ConsoleStation, admin: Operator, browser: Any) -> None:
    cert_file, key_file, key = enrolled(console_station, tmp_path, "line3-pump-7")
    enrolled(console_station, tmp_path, "line3-fan-1")
    (row,) = console_station.rows("line3-pump-7")
    driver = browser(admin)
    driver.get(console_station.console_url + "/devices")
    driver.find_element(By.ID, "prefix").send_keys("line3-p")
    driver.find_element(By.ID, "search").click()
    wait_for(driver, "search results", lambda d: "prefix=line3-p" in d.current_url)
    results = text_of(driver, "#results")
    assert "line3-pump-7" in results and row.serial in results and "line3-fan-1" not in results
    screenshot(driver, "devices")

    driver.find_element(By.LINK_TEXT, "line3-pump-7").click()
    wait_for(driver, "the device's history", lambda d: d.find_elements(By.ID, "history"))
    assert row.serial in text_of(driver, "#history") and "valid" in text_of(driver, "#history")
    screenshot(driver, "device")
    driver.find_element(By.ID, "revoke-device").click()
    wait_for(driver, "the confirmation", lambda d: d.find_elements(By.ID, "confirm"))
    assert row.serial in text_of(driver, "#targets") and "line3-pump-7" in text_of(driver, "#confirm-what")
    assert console_station.rows("line3-pump-7")[0].revoked_at is None, "nothing is revoked before confirming"
    screenshot(driver, "revoke-confirm")
    driver.find_element(By.ID, "confirm").click()
    wait_for(driver, "the revoked history", lambda d: "revoked" in text_of(d, "#history"))
    assert console_station.rows("line3-pump-7")[0].revoked_at is not None
    assert console_station.rows("line3-fan-1")[0].revoked_at is None

    # the device is refused from now on: re-enrollment with its certificate fails
    with EstClient(console_station.url, str(console_station.ca_file),
                   auth=ClientCertAuth(str(cert_file), str(key_file))) as c, pytest.raises(EnrollmentError) as no:
        c.simplereenroll(build_csr(key, "line3-pump-7", TRUST_DOMAIN))
    assert no.value.status == 403 and "was revoked" in str(no.value)
    driver.get(console_station.console_url + "/audit")
    assert "revoke" in text_of(driver, "#audit") and "line3-pump-7" in text_of(driver, "#audit")
    assert "alice" in text_of(driver, "#audit")
    screenshot(driver, "audit")


def test_batch_of_50_shows_progress_then_a_label_sheet_once(
        tmp_path: Path, console_station: ConsoleStation, admin: Operator, browser: Any) -> None:
    driver = browser(admin)
    driver.get(console_station.console_url + "/batches")
    driver.find_element(By.ID, "pattern").send_keys("pump-{0001..0050}")
    driver.find_element(By.ID, "make").click()
    wait_for(driver, "the hand-over forms", lambda d: d.find_elements(By.ID, "take-labels"))
    assert text_of(driver, "#made-text") == "50 / 50"
    screenshot(driver, "batch")
    driver.find_element(By.ID, "take-labels").click()
    wait_for(driver, "the label sheet", lambda d: d.find_elements(By.ID, "sheet"))
    labels = driver.find_elements(By.CSS_SELECTOR, "#sheet .label")
    assert len(labels) == 50
    assert len(driver.find_elements(By.CSS_SELECTOR, "#sheet .label svg")) == 50
    first_id = labels[0].find_element(By.CSS_SELECTOR, ".id").text
    first_otp = labels[0].find_element(By.CSS_SELECTOR, ".otp").text
    assert first_id == "pump-0001" and len(first_otp) == 26
    screenshot(driver, "labels")

    # the password on the label enrolls that device, and the batch counts it
    with EstClient(console_station.url, str(console_station.ca_file), auth=BasicAuth(first_id, first_otp)) as c:
        c.simpleenroll(build_csr(generate("ec-p256"), first_id, TRUST_DOMAIN))
    driver.back()
    driver.refresh()
    wait_for(driver, "the batch page", lambda d: d.find_elements(By.ID, "enrolled-text"))
    assert text_of(driver, "#enrolled-text") == "1 / 50"
    assert not driver.find_elements(By.ID, "take-labels"), "the label sheet must not be offered twice"
    assert driver.find_elements(By.ID, "take-csv"), "the CSV is still owed once"
    driver.get(console_station.console_url + "/batches")
    assert "pump-{0001..0050}" in text_of(driver, "#batches") and "1 / 50" in text_of(driver, "#batches")
    screenshot(driver, "batches")


def test_readonly_operator_sees_pages_but_is_refused_an_admin_action(
        tmp_path: Path, console_station: ConsoleStation, readonly: Operator, browser: Any) -> None:
    enrolled(console_station, tmp_path, "ro-dev-1")
    driver = browser(readonly)
    driver.get(console_station.console_url + "/devices/ro-dev-1")
    assert "bob · readonly" in text_of(driver, "#me")
    assert not driver.find_elements(By.ID, "revoke-device"), "no revoke button for a read-only operator"
    driver.get(console_station.console_url + "/devices/ro-dev-1/revoke")
    assert "Refused (403)" in driver.find_element(By.TAG_NAME, "h1").text
    assert "needs the admin role; operator bob is readonly" in text_of(driver, "#reason")
    driver.get(console_station.console_url + "/batches")
    assert not driver.find_elements(By.ID, "make")
    driver.get(console_station.console_url + "/exports")
    screenshot(driver, "exports")
    assert console_station.rows("ro-dev-1")[0].revoked_at is None


def test_the_live_page_of_an_operator_revoked_while_watching_stops_and_says_why(
        tmp_path: Path, console_station: ConsoleStation, browser: Any) -> None:
    frank = console_station.operator("frank", "readonly", tmp_path / "frank")
    driver = browser(frank)
    driver.get(console_station.console_url + "/live")
    wait_for(driver, "the live stream to connect", lambda d: text_of(d, "#stream-state") == "live")
    console_station.cli("operator", "revoke", "frank")
    wait_for(driver, "the page to say its stream was closed",
             lambda d: text_of(d, "#stream-state").startswith("closed: "))
    assert "frank's certificate was revoked" in text_of(driver, "#stream-state")
