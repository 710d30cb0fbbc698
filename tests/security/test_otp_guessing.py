"""Issue 13 case 4: one-time passwords cannot be guessed at speed. Wrong guesses are rate-limited per
device id and per client address (429 with Retry-After), a device's OTP locks after
`otp_max_failures` wrong guesses (the right one no longer works), the lockout is logged once, and
only a new OTP from the operator unlocks the device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning.station.ratelimit import FailureLimiter
from tests.security.stationbed import post_enroll, set_settings
from tests.station.conftest import RunningStation, start_station

WRONG = "aaaaaaaaaaaaaaaaaaaaaaaaaa"


@pytest.fixture
def guarded(station_dir: Path, request: pytest.FixtureRequest) -> Iterator[RunningStation]:
    set_settings(station_dir, **request.param)
    running = start_station(station_dir, workers=1)  # one process: one set of rate-limit counters
    try:
        yield running
    finally:
        running.proc.stop()


@pytest.mark.parametrize("guarded", [{"otp_max_failures": 3, "otp_failure_burst": 1000}], indirect=True)
def test_the_right_otp_no_longer_works_after_the_lockout_and_the_lockout_is_logged_once(
        guarded: RunningStation) -> None:
    password = guarded.otp("pump-7")
    for _ in range(5):
        assert post_enroll(guarded, "pump-7", WRONG).status == 401
    locked = post_enroll(guarded, "pump-7", password)
    assert locked.status == 403 and "locked after too many wrong guesses" in locked.body, locked
    assert "tether-station otp pump-7" in locked.body
    assert guarded.rows("pump-7") == []
    log = (guarded.directory / "serve.log").read_text()
    assert log.count("one-time password of device pump-7 locked after 3 wrong guesses") == 1, log

    # the operator issues a new password: it works, the locked one stays locked
    fresh = guarded.otp("pump-7")
    assert post_enroll(guarded, "pump-7", password).status == 403
    assert post_enroll(guarded, "pump-7", fresh).status == 200
    assert len(guarded.rows("pump-7")) == 1


@pytest.mark.parametrize("guarded", [{"otp_failure_burst": 3, "otp_failure_window": 3600,
                                      "otp_max_failures": 1000}], indirect=True)
def test_wrong_guesses_for_one_device_are_rate_limited_whatever_address_they_come_from(
        guarded: RunningStation) -> None:
    password = guarded.otp("pump-8")
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        assert post_enroll(guarded, "pump-8", WRONG, source=source).status == 401
    limited = post_enroll(guarded, "pump-8", password, source="127.0.0.5")  # even the right one waits
    assert limited.status == 429 and "device 'pump-8'" in limited.body, limited
    assert 1 <= int(limited.headers["retry-after"]) <= 3600
    assert guarded.rows("pump-8") == []
    # another device from another address is not held up
    assert post_enroll(guarded, "pump-9", guarded.otp("pump-9"), source="127.0.0.6").status == 200


@pytest.mark.parametrize("guarded", [{"otp_failure_burst": 3, "otp_failure_window": 3600,
                                      "otp_max_failures": 1000}], indirect=True)
def test_wrong_guesses_from_one_address_are_rate_limited_across_device_ids(guarded: RunningStation) -> None:
    for device in ("a-1", "a-2", "a-3"):  # made-up ids: nothing in the ledger to lock, still counted
        assert post_enroll(guarded, device, WRONG, source="127.0.0.7").status == 401
    password = guarded.otp("a-4")
    limited = post_enroll(guarded, "a-4", password, source="127.0.0.7")
    assert limited.status == 429 and "client 127.0.0.7" in limited.body, limited
    assert int(limited.headers["retry-after"]) >= 1
    assert post_enroll(guarded, "a-4", password, source="127.0.0.8").status == 200


def test_the_limiter_lets_a_key_try_again_when_its_oldest_failure_leaves_the_window() -> None:
    limiter = FailureLimiter(burst=2, window=60)
    limiter.failed("dev", 100.0)
    limiter.failed("dev", 130.0)
    assert limiter.retry_after("dev", 131.0) == 29
    assert limiter.retry_after("other", 131.0) is None
    assert limiter.retry_after("dev", 160.0) is None  # the failure at 100 is out of the window
    limiter.failed("dev", 160.0)
    assert limiter.retry_after("dev", 161.0) == 29


def test_the_limiter_table_is_bounded() -> None:
    limiter = FailureLimiter(burst=1, window=60, max_keys=3)
    for i in range(10):
        limiter.failed(f"10.0.0.{i}", 1.0)
    assert limiter.retry_after("10.0.0.9", 2.0) is not None
    assert limiter.retry_after("10.0.0.0", 2.0) is None
