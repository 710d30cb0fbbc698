"""Token log lines are read by people (issue 26): times as `in N min (ISO UTC)`, never epoch floats, and
no doubled `token: token:` prefix."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.config import load
from agent.token import TokenService
from tests.conftest import write_config

NOW = 1_796_601_600.0  # 2026-12-07T00:00:00Z


def test_a_received_token_is_logged_with_readable_times(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens = TokenService(load(write_config(tmp_path / "dev", "dev-001")), clock=lambda: NOW)
    schedule = SimpleNamespace(expires_at=lambda: NOW + 600.25, refresh_at=lambda: NOW + 300.125)
    with caplog.at_level(logging.INFO, logger="agent.token"):
        tokens.adopted("a.b.c", schedule)
    assert caplog.messages == ["token: received, expires in 10 min (2026-12-07T00:10:00Z), "
                               "refresh in 5 min (2026-12-07T00:05:00Z)"]


def test_a_token_problem_names_the_token_once_and_says_when_in_seconds() -> None:
    from tests.unit import supervisor_scenarios as scenarios

    trace = scenarios.token_schedule()
    problems = [line for line in map(str, trace) if "Problem what=token" in line]
    assert problems, trace
    for line in problems:
        detail = line.split("detail=", 1)[1]
        assert not detail.startswith("token:") and ": token:" not in detail, line
        assert "asking again in " in detail and "asking again at" not in detail, line
