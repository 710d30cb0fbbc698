"""The station's systemd unit (issue 28 item 2): its own user, sandboxed like the agent's, Type=notify.

Checked with systemd's own tools on the files we ship, as tests/security/test_unit.py does for the agent:
`systemd-analyze security --offline=true` (<= 2.0), `systemd-analyze verify`, `systemd-sysusers` in a
scratch root. And the notify protocol end to end: a real `tether-station serve` sends READY=1 to a
NOTIFY_SOCKET the test binds, only once its EST port answers.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

from lab.procs import Proc, read_port_file
from provisioning.station import service
from tests.conftest import REPO, require_tool
from tests.security.test_unit import analyze, settings

UNIT = REPO / "provisioning" / "station" / "units" / "tether-station.service"
SYSUSERS = REPO / "provisioning" / "station" / "units" / "tether-station.sysusers.conf"
GOAL = 2.0


def test_station_exposure_score_is_at_most_two() -> None:
    out = analyze("security", "--offline=true", "--threshold=20", str(UNIT))
    report = out.stdout + out.stderr
    match = re.search(r"Overall exposure level for tether-station.service: (\d+\.\d+)", report)
    assert match, report
    score = float(match.group(1))
    print(f"systemd-analyze security --offline=true {UNIT.name}: {score}")
    assert score <= GOAL, report
    assert out.returncode == 0, report


def test_the_station_runs_as_its_own_user_in_its_state_directory_with_no_devices() -> None:
    unit = settings(UNIT)
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["User"] == ["tether-station"] and unit["Group"] == ["tether-station"]
    assert "DynamicUser" not in unit  # the CA keys and the ledger keep one owner across restarts
    assert unit["StateDirectory"] == ["tether-station"] and unit["StateDirectoryMode"] == ["0700"]
    assert unit["Environment"] == ["TETHER_STATION_DIR=/var/lib/tether-station"]
    assert unit["ExecStart"] == ["/usr/local/bin/tether-station serve --config /etc/tether/station.toml"]
    assert unit["ProtectSystem"] == ["strict"] and unit["PrivateDevices"] == ["yes"]
    assert unit["DevicePolicy"] == ["closed"] and "DeviceAllow" not in unit
    assert unit["CapabilityBoundingSet"] == [""] and unit["AmbientCapabilities"] == [""]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


def test_the_station_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "tether-station.service"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/tether-station " in text
    unit.write_text(text.replace("ExecStart=/usr/local/bin/tether-station ",
                                 f"ExecStart={sys.executable} -m provisioning.station.cli "))
    out = analyze("verify", str(unit))
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_sysusers_creates_the_station_user(tmp_path: Path) -> None:
    tool = require_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    out = subprocess.run([tool, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert passwd["tether-station"][5:] == ["/var/lib/tether-station", "/usr/sbin/nologin"]
    assert int(passwd["tether-station"][2]) != 0


def test_ready_reaches_systemd_only_once_the_est_port_answers(tmp_path: Path) -> None:
    directory = tmp_path / "station"
    subprocess.run([sys.executable, "-m", "provisioning.station.cli", "init", "--dir", str(directory)], cwd=REPO,
                   check=True, capture_output=True, timeout=60)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    config = tmp_path / "station.toml"
    config.write_text(f'[serve]\ndir = "{directory}"\nlisten = "127.0.0.1:0"\nworkers = 2\n')
    port_file = tmp_path / "ports.json"
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = Proc("tether-station", [sys.executable, "-m", "provisioning.station.cli", "serve", "--config", str(config),
                                   "--port-file", str(port_file)], tmp_path / "serve.log", cwd=REPO, env=env)
    try:
        notify.settimeout(30)
        message = notify.recv(4096).decode()
        # READY=1 came: the port must answer now, with no waiting
        port = read_port_file(port_file, proc)["est"]
        ctx = ssl.create_default_context(cafile=str(directory / "ca.pem"))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/.well-known/est/cacerts", context=ctx,
                                    timeout=5) as answer:
            assert answer.status == 200
        assert message.splitlines() == ["READY=1", f"STATUS=EST on port {port}, 2 worker(s)"]
        proc.stop()
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        proc.stop()
        notify.close()


def test_service_config_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    config = tmp_path / "station.toml"
    config.write_text('[serve]\nworkers = "four"\n')
    out = subprocess.run([sys.executable, "-m", "provisioning.station.cli", "serve", "--config", str(config)],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == f"tether-station: error: {config}: [serve] workers = 'four': expected int"
    config.write_text('[serve]\nlisen = "127.0.0.1:8443"\n')
    assert service.resolve({}, None) == service.DEFAULTS
    try:
        service.load(config)
    except Exception as exc:
        assert str(exc).startswith(f"{config}: [serve] lisen: unknown key; expected one of ")
    else:
        raise AssertionError("a misspelt key was accepted")
    config.write_text('[serve]\nlisten = "127.0.0.1:9000"\nworkers = 3\n')
    resolved = service.resolve({"listen": "127.0.0.1:9001", "workers": None}, config)
    assert (resolved.listen, resolved.workers) == ("127.0.0.1:9001", 3)  # the command line wins, the file fills in
