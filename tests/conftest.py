"""Shared fixtures: real swtpm + tpm2-abrmd, real mosquitto, a test PKI, device configs.

Every server starts on a free loopback port, is waited for by polling with a deadline, and is stopped
when the test ends. A missing tool fails the test loudly: CI installs them all (scripts/install-deps.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from lab.mosquitto import BrokerFiles, Mosquitto
from lab.swtpm import SoftTpm
from tests.pki import TRUST_DOMAIN, Pki

REPO = Path(__file__).resolve().parent.parent

# Every property test (unit tests and the fuzz suite) draws the same inputs on every run, so `make test` and
# CI pass or fail the same way on every machine (a newcomer's first run once failed on one random example);
# `make fuzz` (TETHER_FUZZ_EXPLORE=1) explores new inputs instead, and what it finds becomes an @example.
EXPLORE = os.environ.get("TETHER_FUZZ_EXPLORE") == "1"
settings.register_profile("tether", derandomize=not EXPLORE, database=None if not EXPLORE else settings().database)
settings.load_profile("tether")
REQUIRED_TOOLS = ("mosquitto", "swtpm", "tpm2-abrmd", "dbus-daemon", "openssl", "tpm2_getrandom")


def require_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/install-deps.sh (CI does)", pytrace=False)
    return path


@pytest.fixture
def softtpm(tmp_path: Path) -> Iterator[SoftTpm]:
    for tool in ("swtpm", "tpm2-abrmd", "dbus-daemon", "tpm2_getrandom"):
        require_tool(tool)
    tpm = SoftTpm(tmp_path / "tpm").start()
    saved = {k: os.environ.get(k) for k in tpm.env}
    tpm.apply_env()
    try:
        yield tpm
    finally:
        tpm.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
def broker_factory(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., Mosquitto]]:
    """Start mTLS brokers whose server certificate and client CA come from `pki`."""
    require_tool("mosquitto")
    started: list[Mosquitto] = []

    def start(name: str = "broker", **kw: Any) -> Mosquitto:
        certfile, keyfile = pki.server_files(name)
        files = BrokerFiles(cafile=pki.ca_chain_file, certfile=certfile, keyfile=keyfile,
                            crlfile=kw.pop("crlfile", None))
        broker = Mosquitto(tmp_path / name, files, name=name, **kw).start()
        started.append(broker)
        return broker

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return broker_factory()


def write_config(directory: Path, device_id: str = "dev-001", **sections: dict[str, Any]) -> Path:
    """A device config TOML in `directory` with state in `directory/state`."""
    from provisioning.tomlfmt import to_toml

    sections.setdefault("device", {})
    sections["device"] = {"id": device_id, "state_dir": str(directory / "state"),
                          "trust_domain": TRUST_DOMAIN, **sections["device"]}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tether.toml"
    path.write_text(to_toml(sections))
    return path


def run_tether(*args: str, config: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process, as a user or a boot script would."""
    argv = [sys.executable, "-m", "agent.cli"]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=REPO, env={**os.environ, **(env or {})})


# The station's fixtures (a real `tether-station serve`, PostgreSQL) serve the agent and lab tests too.
from tests.station.conftest import postgres, station, station_dir  # noqa: E402, F401
