"""The station's package under a real systemd: installed, its CA keys in SoftHSM2, started by `systemctl`.

test_packaging.py starts the packaged unit with unitbed.py, which cannot apply the unit's sandbox. Here a
Debian machine with systemd as PID 1 (nspawnbed.py: debootstrap's rootfs, cached, booted by
systemd-nspawn) installs the .deb with dpkg and starts tether-station.service as shipped, with its
hardening in force (PrivateUsers=, MemoryDenyWriteExecute=, SystemCallFilter=, ProtectSystem=strict):
the test shows SoftHSM2 and python-pkcs11 work under it, which the stand-in cannot. The machine shares the
host's network, so the test enrolls and scrapes from outside it as a factory line would.

Needs root, systemd-container, debootstrap and a Debian mirror for the first build of the rootfs (76 s to
2.5 min; scripts/install-deps.sh installs the tools). Missing tools fail the test, they never skip it. Warm,
the module takes about 43 s: 38 s building the wheel and the .deb, booting and `dpkg -i` (the package
builds its venv), 5 s of it RestartSec= before systemd restarts the killed station.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from hal.keys.file import generate
from lab.procs import wait_until
from provisioning.certs import to_pem
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, ClientCertAuth, EstClient
from tests.packaging.nspawnbed import Machine, missing_tools, rootfs
from tests.pki import TRUST_DOMAIN, key_pem

REPO = Path(__file__).resolve().parents[2]
UNIT = "tether-station.service"
DATA = "/var/lib/tether-station"
SOFTHSM_CONF = "/etc/tether/softhsm2.conf"
HSM_PIN = "/etc/tether/hsm.pin"
TOKEN = ("pkcs11:token=factory-ca;object=line1?module-path=/usr/lib/softhsm/libsofthsm2.so"
         f"&pin-source={HSM_PIN}")
PORTS = "/run/tether-station/ports.json"


def package_depends(deb: Path) -> list[str]:
    """The names in the built station package's Depends: (the machine has them before dpkg -i, as apt would);
    read from the package, not the control template, whose placeholders the build fills in."""
    line = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, timeout=60,
                          check=True).stdout
    return sorted({re.split(r"[\s(]", item.strip(), maxsplit=1)[0] for item in line.split(",") if item.strip()})


@pytest.fixture(scope="module")
def station_deb(dist: Path) -> Path:
    done = subprocess.run(["bash", str(REPO / "scripts/build-deb-station.sh"), str(dist)], capture_output=True,
                          text=True, timeout=900, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, f"build-deb-station.sh exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def machine(tmp_path: Path, station_deb: Path) -> Iterator[Machine]:
    """A booted machine with the station's package installed (dpkg -i, as an operator would)."""
    if os.geteuid() != 0:
        pytest.fail("booting a systemd machine needs root (CI runs as root)", pytrace=False)
    if missing := missing_tools():
        pytest.fail(f"missing tools: apt-get install {' '.join(missing)} (scripts/install-deps.sh does)",
                    pytrace=False)
    lower = rootfs([*package_depends(station_deb), "softhsm2"], tmp_path / "debootstrap.log")
    booted = Machine(lower, tmp_path / "machine")
    try:
        booted.boot()
        deb = booted.path(f"/root/{station_deb.name}")
        deb.write_bytes(station_deb.read_bytes())
        booted.run("dpkg", "-i", f"/root/{station_deb.name}")
        yield booted
    finally:
        booted.shutdown()


def as_station(machine: Machine, *argv: str) -> str:
    return machine.run("runuser", "-u", "tether-station", "--", "env", f"SOFTHSM2_CONF={SOFTHSM_CONF}",
                       *argv).stdout


def write(machine: Machine, inside: str, text: str, mode: int, owner: str = "root") -> None:
    path = machine.path(inside)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    machine.run("chown", f"{owner}:{owner}", inside)
    machine.run("chmod", f"{mode:o}", inside)


def show(machine: Machine, *properties: str) -> dict[str, str]:
    out = machine.run("systemctl", "show", UNIT, *(f"--property={name}" for name in properties)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def start(machine: Machine) -> dict[str, int]:
    """`systemctl start` (which returns once READY=1 came, Type=notify) and the ports the station chose."""
    started = machine.run("systemctl", "start", UNIT, check=False, timeout=180)
    journal = machine.run("journalctl", "-u", UNIT, "--no-pager", "-n", "40", check=False).stdout
    assert started.returncode == 0, f"systemctl start: {started.stderr}\n{journal}"
    assert machine.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active", journal
    ports: dict[str, int] = json.loads(machine.run("cat", PORTS).stdout)  # written before READY=1
    assert show(machine, "StatusText")["StatusText"] == f"EST on port {ports['est']}, 2 worker(s)"
    return ports


def stop(machine: Machine) -> None:
    machine.run("systemctl", "stop", UNIT, timeout=60)
    result = show(machine, "Result", "ExecMainStatus")
    assert result == {"Result": "success", "ExecMainStatus": "0"}, result


def sandbox_of_main_process(machine: Machine) -> dict[str, str]:
    """What the kernel says about the service's main process: the sandbox systemd put it in."""
    pid = show(machine, "MainPID")["MainPID"]
    status = dict(line.split(":\t", 1) for line in machine.run("cat", f"/proc/{pid}/status").stdout.splitlines()
                  if ":\t" in line)
    uid_map = " ".join(machine.run("cat", f"/proc/{pid}/uid_map").stdout.split())
    return {"Seccomp": status["Seccomp"], "NoNewPrivs": status["NoNewPrivs"], "CapEff": status["CapEff"],
            "uid_map": uid_map}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_station_package_under_systemd_signs_with_softhsm_inside_its_sandbox_and_survives_backup_restore(
        machine: Machine, tmp_path: Path) -> None:
    # The HSM layout docs/station.md gives: tokens in the state directory, the PIN in a 0400 file of the
    # station's user, SOFTHSM2_CONF by a drop-in. The test's own drop-in: ports the kernel picks.
    write(machine, SOFTHSM_CONF, f"directories.tokendir = {DATA}/softhsm-tokens\nobjectstore.backend = file\n"
          "log.level = ERROR\n", 0o644)
    write(machine, HSM_PIN, "246810\n", 0o400, owner="tether-station")
    dropins = f"/etc/systemd/system/{UNIT}.d"
    write(machine, f"{dropins}/hsm.conf", f"[Service]\nEnvironment=SOFTHSM2_CONF={SOFTHSM_CONF}\n", 0o644)
    write(machine, f"{dropins}/zz-test-ports.conf",
          "[Service]\nExecStart=\nExecStart=/opt/tether-station/bin/tether-station serve --config "
          "/etc/tether/station.toml --listen 127.0.0.1:0 --metrics 127.0.0.1:0 --workers 2 "
          f"--port-file {PORTS}\n", 0o644)
    machine.run("systemctl", "daemon-reload")
    machine.run("install", "-d", "-m", "0700", "-o", "tether-station", "-g", "tether-station",
                f"{DATA}/softhsm-tokens")
    as_station(machine, "softhsm2-util", "--init-token", "--free", "--label", "factory-ca", "--so-pin", "13579111",
               "--pin", "246810")
    as_station(machine, "/usr/bin/tether-station", "init", "--dir", DATA, "--trust-domain", TRUST_DOMAIN,
               "--keys", TOKEN)
    assert not machine.path(f"{DATA}/issuing.key").exists() and not machine.path(f"{DATA}/root.key").exists()

    ports = start(machine)
    # The unit's sandbox is in force on the process that signs with the token: a seccomp filter
    # (SystemCallFilter= and MemoryDenyWriteExecute= are both seccomp), no new privileges, no
    # capabilities, and a user namespace mapping only root and the station's user (PrivateUsers=).
    uid = machine.run("id", "-u", "tether-station").stdout.strip()
    assert sandbox_of_main_process(machine) == {"Seccomp": "2", "NoNewPrivs": "1", "CapEff": "0000000000000000",
                                                "uid_map": f"0 0 1 {uid} {uid} 1"}
    try:
        otp = as_station(machine, "/usr/bin/tether-station", "otp", "nspawn-dev", "--dir", DATA).strip()
        key = generate("ec-p256")
        ca = str(machine.path(f"{DATA}/ca.pem"))
        with EstClient(f"https://127.0.0.1:{ports['est']}", ca, auth=BasicAuth("nspawn-dev", otp)) as est:
            chain = est.simpleenroll(build_csr(key, "nspawn-dev", TRUST_DOMAIN))
        issuing = x509.load_pem_x509_certificate(machine.path(f"{DATA}/issuing.pem").read_bytes())
        chain[0].verify_directly_issued_by(issuing)  # signed in the token, under the sandbox
        samples = scrape(ports["metrics"])
        assert samples[("tether_station_enrollments_total", (("method", "otp"), ("outcome", "issued")))] == 1
        assert samples[("tether_station_certificates", (("kind", "device"), ("state", "valid")))] == 1
        machine.run("install", "-d", "-m", "0700", "-o", "tether-station", "-g", "tether-station",
                    "/var/backups/tether-station")
        as_station(machine, "/usr/bin/tether-station", "backup", "--out", "/var/backups/tether-station/s.tar.gz",
                   "--dir", DATA)
    finally:
        stop(machine)

    # A new station directory: the old one gone, the archive restored by root and handed to the user
    machine.run("mv", DATA, f"{DATA}.lost")
    machine.run("/usr/bin/tether-station", "restore", "/var/backups/tether-station/s.tar.gz", "--dir", DATA)
    machine.run("chown", "-R", "tether-station:tether-station", DATA)
    ports = start(machine)
    try:
        cert_file, key_file = tmp_path / "dev.pem", tmp_path / "dev.key"
        cert_file.write_bytes(to_pem(chain))
        key_file.write_bytes(key_pem(key))
        with EstClient(f"https://127.0.0.1:{ports['est']}", ca, auth=ClientCertAuth(str(cert_file),
                                                                                    str(key_file))) as est:
            renewed = est.simplereenroll(build_csr(key, "nspawn-dev", TRUST_DOMAIN))
        renewed[0].verify_directly_issued_by(issuing)
        assert scrape(ports["metrics"])[("tether_station_certificates", (("kind", "device"), ("state", "valid")))] \
            == 2
        # systemd restarts it on a crash (Restart=on-failure), and it comes back ready with the token
        before = show(machine, "NRestarts")
        machine.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", UNIT)
        wait_until(lambda: show(machine, "NRestarts", "ActiveState") == {
            "NRestarts": str(int(before["NRestarts"]) + 1), "ActiveState": "active"}, 60,
            "systemd to restart the killed station", describe=lambda: show(machine, "ActiveState", "SubState"))
    finally:
        stop(machine)


def test_missing_tools_are_named_by_the_debian_package_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # none of the bed's tools on it
    assert missing_tools() == ["debootstrap", "systemd-container", "util-linux"]
