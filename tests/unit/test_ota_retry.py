"""The OTA work loop decides from `OtaError.retryable`: a 503 or a dropped connection is tried again,
a bad signature or a 404 ends the operation at once (with its 502)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load
from agent.ota import agent as ota_agent
from agent.ota.errors import DownloadError, VerificationError
from tests.conftest import write_config


@pytest.fixture
def updater(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ota_agent.OtaAgent:
    monkeypatch.setattr(ota_agent, "RETRY_BASE", 0.001)  # the decision is under test, not the delay
    monkeypatch.setattr(ota_agent, "RETRY_CAP", 0.002)
    config = load(write_config(tmp_path / "dev-001", "dev-001", ota={"download_attempts": 3}))
    return ota_agent.OtaAgent(config, lambda line: None, lambda: None, lambda: None)


def drive(updater: ota_agent.OtaAgent, outcomes: list[Exception | None],
          monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[str]]:
    calls: list[int] = []
    failed: list[str] = []

    def attempt() -> Exception | None:
        calls.append(1)
        return outcomes[len(calls) - 1]

    monkeypatch.setattr(updater, "_attempt", attempt)
    monkeypatch.setattr(updater, "_fail", failed.append)
    updater._work()
    return len(calls), failed


def test_retryable_failures_are_tried_again(updater: ota_agent.OtaAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes: list[Exception | None] = [DownloadError("GET x: HTTP 503 (server error)", retryable=True),
                                        DownloadError("GET x: connection lost", retryable=True), None]
    assert drive(updater, outcomes, monkeypatch) == (3, [])


def test_a_fatal_failure_ends_the_update_at_once(updater: ota_agent.OtaAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    assert drive(updater, [VerificationError("signature does not verify")], monkeypatch) == \
        (1, ["signature does not verify"])


def test_retries_stop_after_the_configured_attempts(updater: ota_agent.OtaAgent,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    busy = DownloadError("GET x: HTTP 503 (server error)", retryable=True)
    calls, failed = drive(updater, [busy] * 10, monkeypatch)
    assert calls == 4 and failed == [str(busy)]  # the first try and 3 retries
