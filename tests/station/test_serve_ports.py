"""`tether-station serve --listen HOST:0 --port-file F`: the station binds the port itself and says which,
so a caller never hands it a port that another process could take first."""

from __future__ import annotations

import itertools
import json
import socket
import sys
from pathlib import Path

import psycopg
import pytest

from lab.procs import LabError, Proc, kernel_ports, read_port_file, refusing_port
from tests.conftest import REPO
from tests.station.conftest import PgCluster, RunningStation, serve_station


def test_the_port_file_names_the_ports_the_station_and_its_console_listen_on(station_dir: Path) -> None:
    proc, ports = serve_station(station_dir, ["--workers", "1", "--console", "127.0.0.1:0"])
    try:
        assert set(ports) == {"est", "console"} and 0 not in ports.values()
        assert ports == json.loads((station_dir / "serve.ports.json").read_text())
        assert RunningStation(station_dir, ports["est"], proc).serving()
        with socket.create_connection(("127.0.0.1", ports["console"]), timeout=5):
            pass
        # the same ports as the lines printed for people
        assert f"EST listening on https://127.0.0.1:{ports['est']}/" in proc.output()
        assert f"console on https://127.0.0.1:{ports['console']}/" in proc.output()
    finally:
        proc.stop()


def test_without_a_console_the_port_file_names_only_est(station_dir: Path) -> None:
    proc, ports = serve_station(station_dir, ["--workers", "1"])
    proc.stop()
    assert list(ports) == ["est"]


def test_a_taken_port_fails_the_start_and_writes_no_port_file(station_dir: Path) -> None:
    port_file = station_dir / "ports.json"
    with refusing_port() as taken:
        proc = Proc("tether-station", [sys.executable, "-m", "provisioning.station.cli", "serve", "--dir",
                                       str(station_dir), "--listen", f"127.0.0.1:{taken}", "--port-file",
                                       str(port_file)], station_dir / "taken.log", cwd=REPO)
        with pytest.raises(LabError, match=f"cannot listen on 127.0.0.1:{taken}: Address already in use"):
            read_port_file(port_file, proc)
    assert proc.popen.returncode == 1 and not port_file.exists()


def test_postgresql_starts_again_on_another_port_when_its_port_was_taken() -> None:
    cluster = PgCluster()
    try:
        with refusing_port() as taken:
            url = cluster.start(ports=itertools.chain([taken], kernel_ports()))
        assert cluster.port != taken
        assert "Address already in use" in cluster.log(taken).read_text()
        with psycopg.connect(url, connect_timeout=5) as db:
            assert db.execute("SELECT 1").fetchone() == (1,)
    finally:
        cluster.remove()
