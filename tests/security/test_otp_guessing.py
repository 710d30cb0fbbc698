"""Issue 13 case 4 and issue 22 case 5: one-time passwords cannot be guessed at speed, and nobody's guesses
can stop another device from enrolling. Wrong guesses are limited per client address only (429 with
Retry-After, an IPv6 client per /64), every such wait ends when its window has passed, and nothing is
limited or locked per device id: ids are printed on labels, and a password carries 128 random bits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning.station.ca import Station
from provisioning.station.enrollment import CSR_TYPE, ENROLL, Answer, Enrollment, Request
from provisioning.station.errors import Refusal
from provisioning.station.otp import new_otp, otp_hash
from provisioning.station.ratelimit import FailureLimiter, address_key
from tests.security.stationbed import Client, csr_body, post_enroll, set_settings
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


@pytest.mark.parametrize("guarded", [{"otp_failure_burst": 3, "otp_failure_window": 3600}], indirect=True)
def test_wrong_guesses_from_one_address_are_slowed_across_device_ids(guarded: RunningStation) -> None:
    for device in ("a-1", "a-2", "a-3"):  # made-up ids: nothing in the ledger, still counted
        assert post_enroll(guarded, device, WRONG, source="127.0.0.7").status == 401
    password = guarded.otp("a-4")
    limited = post_enroll(guarded, "a-4", password, source="127.0.0.7")
    assert limited.status == 429 and "client 127.0.0.7" in limited.body, limited
    assert 1 <= int(limited.headers["retry-after"]) <= 3600
    assert post_enroll(guarded, "a-4", password, source="127.0.0.8").status == 200


@pytest.mark.parametrize("guarded", [{}], indirect=True)  # the defaults: 5 wrong guesses per address a minute
def test_the_right_password_from_another_address_works_after_1000_wrong_ones_for_its_id(
        guarded: RunningStation) -> None:
    password = guarded.otp("pump-8")
    body = csr_body("pump-8")
    statuses: dict[int, int] = {}
    for n in range(250):  # 250 addresses, 4 wrong guesses each: under every address's limit
        with Client(guarded, f"127.0.1.{n + 1}") as client:
            for _ in range(4):
                status = client.enroll("pump-8", WRONG, body).status
                statuses[status] = statuses.get(status, 0) + 1
    assert statuses == {401: 1000}, statuses
    assert guarded.rows("pump-8") == []
    right = post_enroll(guarded, "pump-8", password, source="127.0.2.1")
    assert right.status == 200, right
    assert len(guarded.rows("pump-8")) == 1


@pytest.fixture
def enrollment(station_dir: Path) -> Iterator[tuple[Enrollment, list[float]]]:
    """The station's decisions in-process on its real ledger, with a clock the test moves."""
    set_settings(station_dir, otp_failure_burst=3, otp_failure_window=60)
    station = Station(station_dir)
    ledger = station.open_ledger()
    now = [float(int(time.time()))]
    try:
        yield Enrollment(station, ledger, clock=lambda: now[0]), now
    finally:
        ledger.close()


def attempt(enrollment: Enrollment, device_id: str, password: str, client: str) -> Answer | Refusal:
    request = Request(ENROLL, CSR_TYPE, csr_body(device_id), basic=(device_id, password), client=client)
    try:
        return enrollment.handle(request)
    except Refusal as refusal:
        return refusal


def give_password(enrollment: Enrollment, device_id: str, now: float) -> str:
    password = new_otp()
    enrollment.ledger.add_otp(device_id, otp_hash(device_id, password), int(now), int(now) + 3600)
    return password


def test_an_address_that_guessed_too_often_may_try_again_once_its_window_has_passed(
        enrollment: tuple[Enrollment, list[float]]) -> None:
    decide, now = enrollment
    password = give_password(decide, "pump-1", now[0])
    for _ in range(3):
        wrong = attempt(decide, "pump-1", WRONG, "10.0.0.1")
        assert isinstance(wrong, Refusal) and wrong.status == 401
        now[0] += 1
    limited = attempt(decide, "pump-1", password, "10.0.0.1")
    assert isinstance(limited, Refusal) and limited.status == 429 and limited.headers["Retry-After"] == "57"
    now[0] += 56
    still = attempt(decide, "pump-1", password, "10.0.0.1")
    assert isinstance(still, Refusal) and still.status == 429 and still.headers["Retry-After"] == "1"
    now[0] += 1  # the first wrong guess leaves the window: the address may try again
    assert isinstance(attempt(decide, "pump-1", password, "10.0.0.1"), Answer)


def test_an_ipv6_client_is_limited_per_64_and_nothing_is_limited_per_device_id(
        enrollment: tuple[Enrollment, list[float]]) -> None:
    decide, now = enrollment
    for client in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff:ffff:ffff:ffff"):
        assert isinstance(attempt(decide, "pump-2", WRONG, client), Refusal)
    limited = attempt(decide, "pump-2", give_password(decide, "pump-2", now[0]), "2001:db8:1:2::99")
    assert isinstance(limited, Refusal) and limited.status == 429, limited
    # the same device id from the next /64, and an IPv4 client: the right password works
    assert isinstance(attempt(decide, "pump-2", give_password(decide, "pump-2", now[0]), "2001:db8:1:3::1"), Answer)
    assert isinstance(attempt(decide, "pump-3", give_password(decide, "pump-3", now[0]), "10.0.0.2"), Answer)


def test_addresses_are_keyed_as_the_client_can_vary_them() -> None:
    assert address_key("10.1.2.3") == "10.1.2.3"
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("not an address") == "not an address"


def test_a_station_toml_from_before_still_loads_with_the_retired_lockout_setting(station_dir: Path) -> None:
    set_settings(station_dir, otp_max_failures=10)
    assert Station(station_dir).settings.otp_failure_burst == 5


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
