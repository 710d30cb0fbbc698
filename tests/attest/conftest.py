"""Attested enrollment beds: swtpm TPMs "manufactured" by swtpm's local CA (EK certificates in NV), a
station that trusts that CA, and devices configured for `[enroll] method = "tpm-attestation"`.

Manufacturing a TPM (RSA and ECC EK generation in libtpms) takes seconds, so each named TPM is made once
per session and its state copied into every test that uses it: tests get distinct TPMs by name.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.swtpm import EkCa, SoftTpm
from tests.conftest import require_tool, write_config
from tests.station.conftest import RunningStation, start_station, station_cli

TCTI = "tabrmd:bus_type=session"


@dataclass
class TpmMaker:
    """swtpm's local CA and the TPMs it manufactured this session, by name."""

    ca: EkCa
    base: Path
    made: dict[str, Path] = field(default_factory=dict)

    def state(self, name: str) -> Path:
        """The TPM state of the manufactured TPM `name` (made on first use)."""
        if name not in self.made:
            directory = self.base / f"tpm-{name}"
            self.ca.manufacture(directory)
            self.made[name] = directory
        return self.made[name]


@pytest.fixture(scope="session")
def tpm_maker(tmp_path_factory: pytest.TempPathFactory) -> TpmMaker:
    for tool in ("swtpm", "swtpm_setup", "swtpm_localca", "tpm2-abrmd", "dbus-daemon", "tpm2_getrandom"):
        require_tool(tool)
    base = tmp_path_factory.mktemp("ek-maker")
    maker = TpmMaker(EkCa(base / "ca"), base)
    maker.state("a")  # the first TPM made also makes the CA's root and issuing certificates
    return maker


@pytest.fixture
def ek_ca(tpm_maker: TpmMaker) -> EkCa:
    return tpm_maker.ca


@pytest.fixture
def tpm_states(tpm_maker: TpmMaker) -> Callable[[str], Path]:
    return tpm_maker.state


def start_tpm(directory: Path, state: Path) -> SoftTpm:
    (directory / "state").mkdir(parents=True, exist_ok=True)
    for item in state.iterdir():
        if item.is_file() and not item.name.startswith("."):
            shutil.copy(item, directory / "state" / item.name)
    return SoftTpm(directory).start()


@pytest.fixture
def attested_tpm(tmp_path: Path, tpm_states: Callable[[str], Path]) -> Iterator[SoftTpm]:
    """TPM "a", with EK certificates from `ek_ca`, running; its bus and TCTI in this process's environment."""
    tpm = start_tpm(tmp_path / "tpm", tpm_states("a"))
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


def trust_maker(station_dir: Path, ek_ca: EkCa, **settings: object) -> None:
    """Make the station at `station_dir` trust `ek_ca`'s EK certificates (plus more station.toml keys)."""
    (station_dir / "ek-roots.pem").write_bytes(ek_ca.roots_pem)
    values = {"ek_roots": '"ek-roots.pem"', **{k: str(v).lower() if isinstance(v, bool) else str(v)
                                                for k, v in settings.items()}}
    toml = station_dir / "station.toml"
    text = toml.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, f"station.toml has no {key} line"
    toml.write_text(text)


@pytest.fixture
def attest_station(station_dir: Path, ek_ca: EkCa) -> Iterator[RunningStation]:
    """A station that trusts the test TPM maker."""
    trust_maker(station_dir, ek_ca)
    running = start_station(station_dir, workers=1)
    try:
        yield running
    finally:
        running.proc.stop()


def attest_config(tmp_path: Path, station: RunningStation, device_id: str = "dev-att", **sections: object) -> Path:
    """A device config enrolling by TPM attestation against `station`, its key in the TPM."""
    sections.setdefault("keys", {"uri": f"tpm:?tcti={TCTI}"})
    sections.setdefault("enroll", {"method": "tpm-attestation"})
    return write_config(tmp_path / device_id, device_id, est={"url": station.url, "ca_file": str(station.ca_file)},
                        identity={"ca_file": str(station.ca_file)}, **sections)  # type: ignore[arg-type]


__all__ = ["TCTI", "attest_config", "start_tpm", "station_cli", "trust_maker"]
