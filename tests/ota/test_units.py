"""Pure parts of OTA: version order, the transition table, release checks, status rendering, light imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.core.version import VersionError, compare_versions
from agent.ota.cli import progress_bar, render
from agent.ota.errors import TransitionError
from agent.ota.machine import TRANSITIONS, OtaState
from agent.ota.release import release_base
from tests.conftest import REPO


@pytest.mark.parametrize(("a", "b", "order"), [
    ("1.2", "1.2.0", 0), ("1.10.0", "1.9.9", 1), ("1.0.0-rc1", "1.0.0", -1),
    ("1.0.0-rc.2", "1.0.0-rc.10", -1), ("1.0.0-1", "1.0.0-alpha", -1), ("2", "1.99.99", 1),
])
def test_versions_order_numerically_with_prereleases_first(a: str, b: str, order: int) -> None:
    assert compare_versions(a, b) == order
    assert compare_versions(b, a) == -order


@pytest.mark.parametrize("bad", ["", "1..2", "v1.0", "1.0-", "1.0-rc_1", "1.2.3.4.5.6.7.8.9"])
def test_malformed_versions_are_refused_with_the_field(bad: str) -> None:
    with pytest.raises(VersionError, match="version a"):
        compare_versions(bad, "1.0")


def test_illegal_transition_names_state_and_event() -> None:
    with pytest.raises(TransitionError, match="event 'session_up' is not allowed in state 'downloading'"):
        OtaState(state="downloading").advance("session_up")


def test_every_busy_state_can_fail_and_no_final_state_is_a_dead_end() -> None:
    from agent.ota.machine import BUSY, FINAL

    assert all((s, "fail") in TRANSITIONS for s in BUSY)
    assert all((s, "start") in TRANSITIONS for s in FINAL)


def test_release_base_accepts_directory_or_manifest_urls() -> None:
    assert release_base("https://h/app/1.1.0") == "https://h/app/1.1.0/"
    assert release_base("https://h/app/1.1.0/manifest.json?x=1") == "https://h/app/1.1.0/"


def test_status_shows_a_progress_bar_only_on_a_terminal() -> None:
    status = {"installed": {"name": "app", "version": "1.0.0", "floor": "1.0.0"}, "state": "downloading",
              "reported": False, "operation": {"name": "app", "version": "1.1.0", "url": "https://h/"},
              "progress": {"bytes": 5_000_000, "size": 10_000_000, "percent": 50}, "reason": "",
              "slots": {"backend": "directory", "active": "a", "trial": False, "versions": {"a": None, "b": None}}}
    assert "[###############...............]  50%" in render(status, tty=True)
    assert "5000000/10000000 bytes (50%)" in render(status, tty=False)
    assert progress_bar(0, 0).startswith("[" + "." * 30)


def test_importing_the_ota_agent_loads_neither_requests_nor_cryptography() -> None:
    code = ("import sys, agent.ota, agent.ota.agent, agent.ota.cli, hal.slots.directory, hal.slots.uboot, "
            "hal.slots.swupdate, hal.slots.rauc, hal.slots.command; "
            "print(sorted(m for m in ('requests', 'cryptography', 'urllib3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
