"""Renewal decides its retries by the error's `retryable`, never by its text (iot-identity-service's
cert-renewal shape): a network failure is retried with backoff, a fatal one stops renewal with a log line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load
from agent.identity import DeviceIdentity
from agent.renewal import Renewal
from lab.procs import refusing_port
from tests.conftest import write_config
from tests.pki import Pki


@pytest.fixture
def closed_port() -> Iterator[int]:
    with refusing_port() as port:  # bound, never listening, held for the test: connections are refused
        yield port


def renewal_for(tmp_path: Path, pki: Pki, port: int, **renewal: object) -> Renewal:
    config = load(write_config(tmp_path / "dev-001", "dev-001", identity={"ca_file": str(pki.root_file)},
                               est={"url": f"https://127.0.0.1:{port}", "timeout": 2.0},
                               renewal={"retry": 30.0, **renewal}))
    identity = DeviceIdentity(config)
    identity.ensure_key()
    identity.install_chain(pki.device_chain(identity.keystore.public_key("device"), "dev-001"))
    return Renewal(config, identity, clock=lambda: 1000.0, rand=lambda: 0.5)


def test_a_network_failure_is_retried_after_a_backoff(tmp_path: Path, pki: Pki, closed_port: int) -> None:
    renewal = renewal_for(tmp_path, pki, closed_port)
    renewal._renew()  # the worker's body, run inline: the station is unreachable
    state = json.loads(Path(renewal.path).read_text())
    assert state["state"] == "idle" and "re-enrollment failed" in state["error"]
    assert state["next_try"] == 1000.0 + 0.5 * 30.0  # full jitter of the first ceiling
    assert renewal.fatal is None


def test_a_fatal_failure_stops_renewal_with_an_error_line(tmp_path: Path, pki: Pki, closed_port: int,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    renewal = renewal_for(tmp_path, pki, closed_port, auth="bearer")  # and no token to present: not a passing problem
    with caplog.at_level(logging.ERROR, logger="tether.renewal"):
        renewal._renew()
    assert renewal.fatal is not None and "no access token" in renewal.fatal
    assert "not retrying" in caplog.text
    renewal.tick(10**10)  # long past due: still no new attempt
    assert renewal._worker is None
    # no retry scheduled (a typed record: always there)
    assert json.loads(Path(renewal.path).read_text())["next_try"] == 0


# -- the persisted transition table (agent/renewal.py) -------------------------------------------------
def test_renewal_transitions_are_a_table_and_an_illegal_event_names_state_and_event() -> None:
    from agent.renewal import TRANSITIONS, RenewalState, RenewalTransitionError

    state = RenewalState()
    for event in ("staged", "proven", "promoted"):
        state = state.advance(event, 1000.0)
    assert state.state == "idle" and state.updated_at == 1000
    assert RenewalState(state="staged").advance("disproven", 0, error="x").state == "idle"
    with pytest.raises(RenewalTransitionError, match="event 'proven' is not allowed in state 'idle'"):
        RenewalState().advance("proven", 0)  # only a staged pair is proven
    with pytest.raises(RenewalTransitionError, match="event 'staged' is not allowed in state 'promoting'"):
        RenewalState(state="promoting").advance("staged", 0)  # a promotion is finished before a new pair
    assert {s for s, _ in TRANSITIONS} == {"idle", "staged", "promoting"}


def test_each_renewal_step_is_written_before_it_acts(tmp_path: Path, pki: Pki, closed_port: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`promoting` is on disk before the pair is swapped: a cut in between is finished by on_boot."""
    renewal = renewal_for(tmp_path, pki, closed_port)
    renewal._staged("device")
    seen: list[str] = []
    monkeypatch.setattr(renewal, "_finish_promotion",
                        lambda: seen.append(json.loads(Path(renewal.path).read_text())["state"]))
    renewal.proven()
    assert seen == ["promoting"]
