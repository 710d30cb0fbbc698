"""The OTA updater decides from `OtaError.retryable`: a 503 or a dropped connection is tried again
once the loop wakes at the retry's time (`wake_at`), a bad signature or a 404 ends the operation at
once (with its 502). Driven by calling it, as its control loop does, with a fake clock: no threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.config import load
from agent.ota import agent as ota_agent
from agent.ota.errors import DownloadError, VerificationError
from tests.conftest import write_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def updater(tmp_path: Path, clock: Clock) -> ota_agent.OtaAgent:
    config = load(write_config(tmp_path / "dev-001", "dev-001", ota={"download_attempts": 3}))
    return ota_agent.OtaAgent(config, lambda line: None, lambda: None, lambda: None, call_soon=lambda fn: fn(),
                              clock=clock, rand=lambda: 0.5)


def drive(updater: ota_agent.OtaAgent, clock: Clock, outcomes: list[Exception | None],
          monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[str]]:
    """Each attempt is a step whose outcome comes back to the updater on its loop; the loop sleeps
    until `wake_at` and ticks, as agent/control.py does."""
    calls: list[int] = []
    failed: list[str] = []

    def attempt() -> None:
        calls.append(1)
        outcome = outcomes[len(calls) - 1]
        if outcome is not None:
            updater._step_failed(outcome)

    monkeypatch.setattr(updater, "_next", attempt)
    monkeypatch.setattr(updater, "_fail", failed.append)
    updater._begin()
    while (at := updater.wake_at(clock.now)) is not None:
        assert at > clock.now  # a backoff, never a busy loop
        clock.now = at
        updater.tick(clock.now)
    return len(calls), failed


def test_retryable_failures_are_tried_again(updater: ota_agent.OtaAgent, clock: Clock,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes: list[Exception | None] = [DownloadError("GET x: HTTP 503 (server error)", retryable=True),
                                        DownloadError("GET x: connection lost", retryable=True), None]
    assert drive(updater, clock, outcomes, monkeypatch) == (3, [])


def test_a_fatal_failure_ends_the_update_at_once(updater: ota_agent.OtaAgent, clock: Clock,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert drive(updater, clock, [VerificationError("signature does not verify")], monkeypatch) == \
        (1, ["signature does not verify"])


def test_retries_stop_after_the_configured_attempts(updater: ota_agent.OtaAgent, clock: Clock,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    busy = DownloadError("GET x: HTTP 503 (server error)", retryable=True)
    calls, failed = drive(updater, clock, [busy] * 10, monkeypatch)
    assert calls == 4 and failed == [str(busy)]  # the first try and 3 retries


def test_a_retry_waits_on_the_loop_not_in_a_thread(updater: ota_agent.OtaAgent, clock: Clock) -> None:
    """Between attempts the updater holds no thread: the loop wakes it at the retry's time."""
    before = threading.active_count()
    updater._step_failed(DownloadError("GET x: HTTP 503 (server error)", retryable=True))
    at = updater.wake_at(clock.now)
    assert at is not None and at > clock.now and updater.working()
    assert threading.active_count() == before
