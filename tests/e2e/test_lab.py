"""End to end through the lab: `tether-lab up/device/check/down`, several devices at once, a core
killed under its devices, and the README's demo itself."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.core import Lab, LabSettings
from lab.procs import wait_until
from tests.agent_bed import Agent
from tests.conftest import REPO


def lab_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, check=False)


def test_lab_up_device_end_of_line_check_and_down(tmp_path: Path) -> None:
    up = lab_cli("up", "--dir", str(tmp_path / "lab"), "--token-lifetime", "60")
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    try:
        device = lab_cli("device", "--dir", str(tmp_path / "lab"), "eol-unit-1")
        assert device.returncode == 0, device.stderr
        check = lab_cli("check", device.stdout.strip())
        assert check.returncode == 0, check.stdout + check.stderr
        for line in ("PASS  key", "PASS  chain policy", "PASS  connect       mqtts://127.0.0.1:",
                     "PASS  token         expires at", "== PASS"):
            assert line in check.stdout
    finally:
        down = lab_cli("down", "--dir", str(tmp_path / "lab"))
    assert down.returncode == 0, down.stderr
    # everything the lab started is gone: the supervisor and its brokers' ports
    from lab.procs import port_open

    for url in info["brokers"]:
        port = int(url.rsplit(":", 1)[1])
        wait_until(lambda port=port: not port_open("127.0.0.1", port), 10, f"broker port {port} to close")
    assert not (tmp_path / "lab" / "lab.json").exists()


def test_end_of_line_check_fails_for_a_unit_without_credentials(tmp_path: Path) -> None:
    with Lab(tmp_path / "lab", LabSettings(brokers=1)) as lab:
        config = lab.device("eol-unit-2")
        (config.parent / "otp").unlink()  # the line never delivered its one-time password
        check = lab_cli("check", str(config))
        assert check.returncode == 1
        assert "FAIL" in check.stdout and "no enrollment credentials" in check.stdout


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path / "lab", LabSettings(brokers=2, token_lifetime=30)) as running:
        yield running


def test_several_devices_boot_at_once_and_each_gets_its_own_identity(lab: Lab) -> None:
    agents = [Agent(lab.device(f"fleet-{n}")) for n in range(4)]
    try:
        for agent in agents:
            status = agent.wait_status(session="online", timeout=30)
            assert status["endpoint"].startswith("mqtts://127.0.0.1:")
        for n, agent in enumerate(agents):
            wait_until(lambda agent=agent: (agent.status().get("token") or {}).get("present"), 20, "a token",
                       describe=lambda agent=agent: f"status.json {agent.status()}")
            facts = json.loads((agent.state / "certs" / "chain.json").read_text())
            assert facts["common_name"] == f"fleet-{n}"
            assert lab.tokens.requests_from(f"fleet-{n}") or lab.token_services[1].requests_from(f"fleet-{n}")
    finally:
        for agent in agents:
            agent.stop()


def test_devices_fail_over_when_their_core_is_killed(lab: Lab) -> None:
    agents = [Agent(lab.device(f"core-kill-{n}")) for n in range(2)]
    try:
        first = [a.wait_status(session="online", timeout=30)["endpoint"] for a in agents]
        victim = lab.broker_urls.index(first[0].replace("127.0.0.1", "localhost"))
        lab.brokers[victim].kill()
        for agent, endpoint in zip(agents, first, strict=True):
            if endpoint.replace("127.0.0.1", "localhost") == lab.broker_urls[victim]:
                wait_until(lambda agent=agent, endpoint=endpoint: agent.status().get("session") == "online"
                           and agent.status().get("endpoint") != endpoint, 20, "failover to the other core",
                           describe=lambda agent=agent: f"status.json {agent.status()}")
        assert all(a.status()["session"] == "online" for a in agents)
    finally:
        for agent in agents:
            agent.stop()


def test_a_device_holding_another_devices_certificate_cannot_connect(lab: Lab) -> None:
    owner = Agent(lab.device("cert-owner"))
    try:
        owner.wait_status(session="online", timeout=30)
    finally:
        owner.stop()
    thief_config = lab.device("cert-thief")
    assert subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(thief_config), "keygen"],
                          cwd=REPO, check=False, capture_output=True).returncode == 0
    stolen = lab.dir / "devices" / "cert-owner" / "state" / "certs"
    target = thief_config.parent / "state" / "certs"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("chain.pem", "chain.json"):  # the certificate is public; its private key is not
        (target / name).write_bytes((stolen / name).read_bytes())
    check = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(thief_config), "check"],
                           cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert "[key-mismatch]" in check.stdout


@pytest.mark.parametrize("tpm", [False, True], ids=["file-key", "tpm-key"])
def test_the_readme_demo_passes(tpm: bool) -> None:
    demo = subprocess.run([sys.executable, "-m", "lab.demo", *(["--tpm"] if tpm else [])], capture_output=True,
                          text=True, cwd=REPO, timeout=240, check=False)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    for step in ("enrolled", "discovered", "connected", "token #3", "ota"):
        assert f"ok    {step}" in demo.stdout
    assert "PASS:" in demo.stdout
