"""Renewal decides its retries by the error's `retryable`, never by its text (iot-identity-service's
cert-renewal shape): a network failure is retried with backoff, a fatal one stops renewal with a log line."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from agent.config import load
from agent.identity import DeviceIdentity
from agent.renewal import Renewal
from tests.conftest import write_config
from tests.pki import Pki


def closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def renewal_for(tmp_path: Path, pki: Pki, **renewal: object) -> Renewal:
    port = closed_port()
    config = load(write_config(tmp_path / "dev-001", "dev-001", identity={"ca_file": str(pki.root_file)},
                               est={"url": f"https://127.0.0.1:{port}", "timeout": 2.0},
                               renewal={"retry": 30.0, **renewal}))
    identity = DeviceIdentity(config)
    identity.ensure_key()
    identity.install_chain(pki.device_chain(identity.keystore.public_key("device"), "dev-001"))
    return Renewal(config, identity, clock=lambda: 1000.0, rand=lambda: 0.5)


def test_a_network_failure_is_retried_after_a_backoff(tmp_path: Path, pki: Pki) -> None:
    renewal = renewal_for(tmp_path, pki)
    renewal._renew()  # the worker's body, run inline: the station is unreachable
    state = json.loads(renewal.path.read_text())
    assert state["state"] == "idle" and "re-enrollment failed" in state["error"]
    assert state["next_try"] == 1000.0 + 0.5 * 30.0  # full jitter of the first ceiling
    assert renewal.fatal is None


def test_a_fatal_failure_stops_renewal_with_an_error_line(tmp_path: Path, pki: Pki,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    renewal = renewal_for(tmp_path, pki, auth="bearer")  # and no token to present: not a passing problem
    with caplog.at_level(logging.ERROR, logger="tether.renewal"):
        renewal._renew()
    assert renewal.fatal is not None and "no access token" in renewal.fatal
    assert "not retrying" in caplog.text
    renewal.tick(10**10)  # long past due: still no new attempt
    assert renewal._worker is None
    assert "next_try" not in json.loads(renewal.path.read_text())
