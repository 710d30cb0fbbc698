"""A device installs only releases signed under its own station: a release made by a rogue station
(`tether-station init` + `release keygen` + `release sign`, real CLI processes) is refused by the
device's verification, as are a rogue signature presented with the real signer's certificate and a
manifest altered after signing. tests/ota/test_updates.py shows the same refusals end to end through
the OTA agent and the artifact server, before any payload byte moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.ota.errors import VerificationError
from agent.ota.machine import Installed, Operation
from agent.ota.release import check_release, load_anchors
from tests.station.conftest import station_cli


def signed_release(station: Path, out: Path, payload: Path, version: str = "1.1.0") -> Path:
    station_cli("release", "sign", "--name", "app", "--version", version, str(payload), "--out", str(out),
                "--dir", str(station))
    return out


def parts(release: Path) -> tuple[bytes, bytes, bytes]:
    return ((release / "manifest.json").read_bytes(), (release / "manifest.sig").read_bytes(),
            (release / "signer.pem").read_bytes())


@pytest.fixture
def stations(tmp_path: Path, station_dir: Path) -> tuple[Path, Path, Path]:
    rogue = tmp_path / "rogue-station"
    station_cli("init", "--dir", str(rogue), "--trust-domain", "test.tether")
    for directory in (station_dir, rogue):
        station_cli("release", "keygen", "--dir", str(directory))
    payload = tmp_path / "app.tar"
    payload.write_bytes(b"application bundle 1.1.0\n" * 100)
    return station_dir, rogue, payload


def verify(release_parts: tuple[bytes, bytes, bytes], anchors_file: Path) -> dict:
    op = Operation(serial="dev-001", name="app", version="1.1.0", url="https://artifacts.local/app/1.1.0/")
    return check_release(*release_parts, load_anchors(str(anchors_file)), op, Installed(version="1.0.0"))


def test_release_signed_by_an_unknown_key_is_refused(tmp_path: Path, stations: tuple[Path, Path, Path]) -> None:
    official, rogue, payload = stations
    anchors = official / "ca.pem"  # the device trusts its own station's root
    good = parts(signed_release(official, tmp_path / "official-1.1.0", payload))
    assert verify(good, anchors)["version"] == "1.1.0"  # the control

    evil = parts(signed_release(rogue, tmp_path / "rogue-1.1.0", payload))
    with pytest.raises(VerificationError, match="does not chain to a trusted release authority"):
        verify(evil, anchors)
    # the rogue signature under the official signer's certificate chain
    with pytest.raises(VerificationError, match="signature does not verify"):
        verify((evil[0], evil[1], good[2]), anchors)
    # the official signature over a manifest edited afterwards (a bigger version, another hash)
    edited = good[0].replace(b'"version":"1.1.0"', b'"version":"9.9.9"')
    assert edited != good[0]
    with pytest.raises(VerificationError, match="signature does not verify"):
        verify((edited, good[1], good[2]), anchors)
