"""What a user meets before the code: the wheel and sdist, the .deb, the pinned test environment.

These tests build the real artifacts with the project's own scripts (scripts/build-dist.sh,
scripts/build-deb.sh, scripts/build-deb-station.sh), install them the way a user would (a clean venv;
`dpkg -i` on this machine) and run the installed commands: the agent's first boot with its key in swtpm
behind tpm2-abrmd, the station started as its unit says with its CA keys in SoftHSM2. The .deb tests need
root and dpkg, as CI has.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from hal.keys.file import generate
from lab.procs import wait_until
from lab.swtpm import SoftTpm
from provisioning.certs import to_pem
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, ClientCertAuth, EstClient
from provisioning.station.attestation import TPM_FIXED, TPM_RESIDENCY
from tests.attest.conftest import attest_config
from tests.packaging.unitbed import NotifyService
from tests.pki import TRUST_DOMAIN, key_pem
from tests.station.conftest import RunningStation

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
LOCK = REPO / "requirements-test.txt"
SHIPPED_CONF = REPO / "hal" / "keys" / "openssl-tpm2.cnf"
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=False).stdout.strip()
# Where the installed package's TPM OpenSSL configuration is, once the agent's own trust check accepts it
TRUSTED_CONF = "from hal.keys import tpm; print(tpm.trusted_openssl_conf(tpm.SHIPPED_OPENSSL_CONF))"


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_lock_pins_every_dependency_named_in_pyproject() -> None:
    pinned = {requirement_name(line) for line in LOCK.read_text().splitlines() if "==" in line}
    wanted = {requirement_name(spec) for spec in PYPROJECT["project"]["dependencies"]}
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        wanted |= {requirement_name(spec) for spec in extra}
    missing = sorted(wanted - pinned)
    assert not missing, f"requirements-test.txt does not pin {missing}: run `make lock`"


def test_wheel_and_sdist_build_and_pass_twine_check(dist: Path) -> None:
    assert (dist / f"tether-{VERSION}-py3-none-any.whl").is_file()
    assert (dist / f"tether-{VERSION}.tar.gz").is_file()


def test_wheel_and_sdist_carry_the_tpm_providers_openssl_configuration(dist: Path) -> None:
    # TPM keys need it, and it must come from the package, never from the agent's writable state
    with zipfile.ZipFile(dist / f"tether-{VERSION}-py3-none-any.whl") as wheel:
        assert wheel.read("hal/keys/openssl-tpm2.cnf") == SHIPPED_CONF.read_bytes()
    with tarfile.open(dist / f"tether-{VERSION}.tar.gz") as sdist:
        member = sdist.extractfile(f"tether-{VERSION}/hal/keys/openssl-tpm2.cnf")
        assert member is not None and member.read() == SHIPPED_CONF.read_bytes()


def test_wheel_installs_into_a_clean_venv_and_every_command_answers(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", "-c", str(LOCK),
         str(dist / f"tether-{VERSION}-py3-none-any.whl")])
    for command in ("tether", "tether-station", "tether-lab"):
        assert "usage:" in run([str(venv / "bin" / command), "--help"]).stdout
        assert run([str(venv / "bin" / command), "--version"]).stdout.strip() == f"{command} {VERSION}"
    trusted = run([str(venv / "bin/python"), "-c", TRUSTED_CONF], cwd=tmp_path).stdout.strip()
    assert trusted.startswith(str(venv.resolve())) and trusted.endswith("/hal/keys/openssl-tpm2.cnf"), trusted


@pytest.fixture(scope="module")
def installed_deb(dist: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the .deb test installs a package: run it as root (CI does)", pytrace=False)
    done = run(["bash", str(REPO / "scripts/build-deb.sh"), str(dist)], env={**os.environ, "PYTHON": sys.executable})
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.name == f"tether_{VERSION}_{ARCH}.deb"  # tpm2-pytss is compiled: one package per architecture
    run(["dpkg", "-i", str(deb)])
    try:
        yield deb
    finally:
        subprocess.run(["dpkg", "--purge", "tether"], capture_output=True, check=False,
                       env={**os.environ, "TETHER_PURGE_STATE": "yes"})


def test_deb_installs_the_agent_its_user_and_a_unit_systemd_accepts(installed_deb: Path) -> None:
    assert run(["/usr/bin/tether", "--version"]).stdout.strip() == f"tether {VERSION}"
    assert Path("/opt/tether/bin/python").exists()
    groups = run(["id", "-nG", "tether"]).stdout.split()
    assert "tether" in groups and "tss" in groups
    state = Path("/var/lib/tether")
    assert state.stat().st_mode & 0o777 == 0o700
    unit = Path("/lib/systemd/system/tether.service")
    assert "ExecStart=/opt/tether/bin/tether " in unit.read_text()
    # the TPM provider's OpenSSL configuration: root's, read-only, and accepted by the agent as such
    trusted = Path(run(["/opt/tether/bin/python", "-c", TRUSTED_CONF], cwd="/").stdout.strip())
    assert trusted.is_relative_to("/opt/tether") and trusted.stat().st_uid == 0, trusted
    run(["systemd-analyze", "verify", str(unit)])
    assert Path("/etc/tether/tether.toml").read_text().startswith("# /etc/tether/tether.toml")
    listed = run(["dpkg-query", "-W", "-f=${Conffiles}", "tether"]).stdout
    assert "/etc/tether/tether.toml" in listed



def assert_python_is_the_wheels(deb: Path) -> None:
    """The package's python3 dependency admits exactly the CPython its compiled wheels were built for: a newer
    python3 would build /opt/<pkg> from wheels it cannot import."""
    names = run(["dpkg-deb", "-c", str(deb)]).stdout
    tags = set(re.findall(r"/wheels/[^/\s]+-cp3(\d+)-[^/\s]+\.whl", names))
    assert tags, f"{deb.name}: no compiled (cp3xx) wheel in the wheelhouse"
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    for minor in tags:
        assert f"python3 (>= 3.{minor})" in depends and f"python3 (<< 3.{int(minor) + 1})" in depends, (
            f"{deb.name} ships cp3{minor} wheels but depends on {depends.strip()}")

def package_of(library: Path) -> str:
    """The package that installed `library` (dpkg knows it by one of its names: merged /usr has two)."""
    for path in (library, library.resolve()):
        done = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return done.stdout.split(":", 1)[0]
    raise AssertionError(f"{library}: no package installed it")


def test_deb_depends_on_every_library_its_tpm2_pytss_loads(installed_deb: Path) -> None:
    fields = run(["dpkg-deb", "-f", str(installed_deb), "Architecture", "Depends"]).stdout
    assert f"Architecture: {ARCH}" in fields
    assert_python_is_the_wheels(installed_deb)
    depends = {re.split(r"[\s(]", item.strip(), maxsplit=1)[0]
               for item in fields.split("Depends:", 1)[1].split(",")}
    [extension] = Path("/opt/tether").rglob("_libtpm2_pytss*.so")
    resolved = dict(re.findall(r"^\s*(\S+) => (\S+)", run(["ldd", str(extension)]).stdout, re.M))
    # every library the extension names (ELF NEEDED) is found, and comes from a package the .deb depends on ...
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", run(["readelf", "-d", str(extension)]).stdout)
    assert any(name.startswith("libtss2-esys") for name in needed), needed
    for name in needed:
        assert resolved.get(name, "not found") != "not found", f"{extension.name}: {name} not found"
        owner = package_of(Path(resolved[name]))
        assert owner in depends, f"{extension.name} needs {name} from {owner}, not in Depends: {sorted(depends)}"
    # ... and so do the TCTIs libtss2-tctildr opens by name at run time (tcti = "device:..." or "tabrmd:...")
    assert {"libtss2-tcti-device0", "libtss2-tcti-tabrmd0"} <= depends, sorted(depends)


def test_deb_first_boot_enrolls_with_its_key_in_swtpm_and_no_pip_install(installed_deb: Path, tmp_path: Path,
                                                                        attest_station: RunningStation,
                                                                        attested_tpm: SoftTpm) -> None:
    # zero-touch: the device's key is made in the TPM and attested by its EK; no OTP, nothing added to the venv
    config = attest_config(tmp_path, attest_station, "pkg-tpm")
    out = subprocess.run(["/usr/bin/tether", "--config", str(config), "enroll"], capture_output=True, text=True,
                         timeout=300, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "via tpm-attestation" in out.stdout, out.stdout
    chain = x509.load_pem_x509_certificates((tmp_path / "pkg-tpm/state/certs/chain.pem").read_bytes())
    policies = chain[0].extensions.get_extension_for_class(x509.CertificatePolicies).value
    assert {p.policy_identifier for p in policies} == {TPM_RESIDENCY, TPM_FIXED}  # the station saw a TPM key
    [row] = attest_station.rows("pkg-tpm")
    assert row.cert_der == chain[0].public_bytes(serialization.Encoding.DER)


def test_deb_purge_keeps_device_keys_unless_asked(installed_deb: Path) -> None:
    key = Path("/var/lib/tether/keys/device.key")
    key.parent.mkdir(exist_ok=True)
    key.write_text("stand-in for a device key\n")
    run(["dpkg", "--purge", "tether"])
    assert not Path("/opt/tether").exists()
    assert not Path("/usr/bin/tether").exists()
    assert key.read_text() == "stand-in for a device key\n", "purge removed a device key without being asked"
    run(["dpkg", "-i", str(installed_deb)])
    assert key.exists(), "reinstall lost the kept state"
    run(["dpkg", "--purge", "tether"], env={**os.environ, "TETHER_PURGE_STATE": "yes"})
    assert not Path("/var/lib/tether").exists()
    assert subprocess.run(["id", "tether"], capture_output=True, check=False).returncode != 0


# -- the station's package (issue 28 item 2) ------------------------------------------------------------------
STATION_DATA = Path("/var/lib/tether-station")


@pytest.fixture(scope="module")
def installed_station_deb(dist: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the .deb test installs a package: run it as root (CI does)", pytrace=False)
    done = run(["bash", str(REPO / "scripts/build-deb-station.sh"), str(dist)],
               env={**os.environ, "PYTHON": sys.executable})
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.name == f"tether-station_{VERSION}_all.deb"
    run(["dpkg", "-i", str(deb)])
    try:
        yield deb
    finally:
        subprocess.run(["dpkg", "--purge", "tether-station"], capture_output=True, check=False,
                       env={**os.environ, "TETHER_STATION_PURGE_DATA": "1"})


def test_station_deb_installs_the_station_its_user_unit_and_commented_config(installed_station_deb: Path) -> None:
    assert run(["/usr/bin/tether-station", "--version"]).stdout.strip() == f"tether-station {VERSION}"
    assert_python_is_the_wheels(installed_station_deb)
    # the `station` and `hsm` extras are in the venv: console, metrics, PostgreSQL and PKCS#11 tokens
    run(["/opt/tether-station/bin/python", "-c", "import jinja2, segno, psycopg, prometheus_client, pkcs11"])
    user = run(["getent", "passwd", "tether-station"]).stdout.strip().split(":")
    assert int(user[2]) != 0 and user[5:] == ["/var/lib/tether-station", "/usr/sbin/nologin"]
    assert STATION_DATA.stat().st_mode & 0o777 == 0o700
    assert (STATION_DATA.stat().st_uid, STATION_DATA.stat().st_gid) == (int(user[2]), int(user[3]))
    unit = Path("/lib/systemd/system/tether-station.service")
    exec_start = "ExecStart=/opt/tether-station/bin/tether-station serve --config /etc/tether/station.toml"
    assert exec_start in unit.read_text()
    run(["systemd-analyze", "verify", str(unit)])
    sysusers = Path("/usr/lib/sysusers.d/tether-station.conf")
    assert sysusers.stat().st_mode & 0o777 == 0o644 and "u tether-station " in sysusers.read_text()
    config = Path("/etc/tether/station.toml")
    assert config.read_text().startswith("# /etc/tether/station.toml") and config.stat().st_mode & 0o777 == 0o644
    assert "/etc/tether/station.toml" in run(["dpkg-query", "-W", "-f=${Conffiles}", "tether-station"]).stdout
    # the shipped config is valid as it is: serve reads it, and stops at the missing CA with one line
    out = subprocess.run(["/usr/bin/tether-station", "serve", "--config", str(config), "--dir", "/nonexistent"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1 and out.stderr.startswith("tether-station: error: /nonexistent: not a station"), \
        out.stderr


# The HSM layout docs/station.md gives: the SoftHSM2 token directory inside the station's state directory, the
# PIN in a 0400 file of the station's user, SOFTHSM2_CONF given to the service by a drop-in.
SOFTHSM_CONF = Path("/etc/tether/softhsm2.conf")
HSM_PIN = Path("/etc/tether/hsm.pin")
DROPIN_DIR = Path("/etc/systemd/system/tether-station.service.d")
BACKUPS = Path("/var/backups/tether-station-test")
TOKEN = ("pkcs11:token=factory-ca;object=line1?module-path=/usr/lib/softhsm/libsofthsm2.so"
         f"&pin-source={HSM_PIN}")


def as_station(*argv: str) -> subprocess.CompletedProcess[str]:
    """A command as the station's user, with the token's configuration (as `sudo -u tether-station` would)."""
    return run(["runuser", "-u", "tether-station", "--", "env", f"SOFTHSM2_CONF={SOFTHSM_CONF}", *argv])


def empty_station_data() -> None:
    for item in STATION_DATA.iterdir() if STATION_DATA.is_dir() else ():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


@pytest.fixture
def hsm_station_files(installed_station_deb: Path) -> Iterator[None]:
    """The token, its PIN and the unit's drop-ins, made the way docs/station.md says; all removed afterwards."""
    empty_station_data()
    tokens = STATION_DATA / "softhsm-tokens"
    SOFTHSM_CONF.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    SOFTHSM_CONF.chmod(0o644)
    HSM_PIN.write_text("246810\n")
    shutil.chown(HSM_PIN, "tether-station", "tether-station")
    HSM_PIN.chmod(0o400)
    DROPIN_DIR.mkdir(parents=True, exist_ok=True)
    (DROPIN_DIR / "hsm.conf").write_text(f"[Service]\nEnvironment=SOFTHSM2_CONF={SOFTHSM_CONF}\n")
    # the test's own: ports the kernel picks, and where the station says which
    (DROPIN_DIR / "zz-test-ports.conf").write_text(
        "[Service]\nExecStart=\nExecStart=/opt/tether-station/bin/tether-station serve --config "
        "/etc/tether/station.toml --listen 127.0.0.1:0 --metrics 127.0.0.1:0 --workers 2 "
        "--port-file /run/tether-station/ports.json\n")
    try:
        yield
    finally:
        shutil.rmtree(DROPIN_DIR, ignore_errors=True)
        shutil.rmtree(BACKUPS, ignore_errors=True)
        SOFTHSM_CONF.unlink(missing_ok=True)
        HSM_PIN.unlink(missing_ok=True)
        empty_station_data()


def enroll_device(port: int, device_id: str, otp: str) -> tuple[Path, object]:
    key = generate("ec-p256")
    with EstClient(f"https://127.0.0.1:{port}", str(STATION_DATA / "ca.pem"), auth=BasicAuth(device_id, otp)) as est:
        return est.simpleenroll(build_csr(key, device_id, TRUST_DOMAIN)), key


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def started(tmp_path: Path, name: str) -> tuple[NotifyService, dict[str, int]]:
    service = NotifyService("tether-station.service", tmp_path / f"{name}.log")
    try:
        status = service.start()
        ports = json.loads(Path("/run/tether-station/ports.json").read_text())  # written before READY=1
        assert status == f"EST on port {ports['est']}, 2 worker(s)", status
    except BaseException:
        service.stop()
        raise
    return service, ports


def test_packaged_station_with_softhsm_keys_serves_under_its_unit_is_scraped_backed_up_and_restored(
        tmp_path: Path, hsm_station_files: None) -> None:
    # the token, made and used by the station's user only
    tokens = STATION_DATA / "softhsm-tokens"
    run(["install", "-d", "-m", "0700", "-o", "tether-station", "-g", "tether-station", str(tokens)])
    as_station("softhsm2-util", "--init-token", "--free", "--label", "factory-ca", "--so-pin", "13579111",
               "--pin", HSM_PIN.read_text().strip())
    as_station("/usr/bin/tether-station", "init", "--dir", str(STATION_DATA), "--trust-domain", TRUST_DOMAIN,
               "--keys", TOKEN)
    assert not (STATION_DATA / "issuing.key").exists() and not (STATION_DATA / "root.key").exists()
    # the unit with the drop-ins is one systemd accepts, and the HSM one loosens nothing
    unit = Path("/lib/systemd/system/tether-station.service")
    run(["systemd-analyze", "verify", str(unit)])
    report = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert report.returncode == 0, report.stdout + report.stderr

    service, ports = started(tmp_path, "serve")
    try:
        otp = as_station("/usr/bin/tether-station", "otp", "pkg-hsm-dev", "--dir", str(STATION_DATA)).stdout.strip()
        chain, key = enroll_device(ports["est"], "pkg-hsm-dev", otp)
        issuing = x509.load_pem_x509_certificate((STATION_DATA / "issuing.pem").read_bytes())
        chain[0].verify_directly_issued_by(issuing)  # signed by the key in the token
        samples = scrape(ports["metrics"])
        assert samples[("tether_station_enrollments_total", (("method", "otp"), ("outcome", "issued")))] == 1
        assert samples[("tether_station_certificates", (("kind", "device"), ("state", "valid")))] == 1
        # online, by the station's user, into a directory of its own (pytest's tmp_path is root's, 0700)
        run(["install", "-d", "-m", "0700", "-o", "tether-station", "-g", "tether-station", str(BACKUPS)])
        archive = BACKUPS / "station.tar.gz"
        as_station("/usr/bin/tether-station", "backup", "--out", str(archive), "--dir", str(STATION_DATA))
    finally:
        assert service.stop() == 0, service.log.read_text()
    assert service.sent("STOPPING=1")

    # a new host: nothing in /var/lib/tether-station, the archive restored by root and given to the user
    lost = STATION_DATA.with_name("tether-station.lost")
    STATION_DATA.rename(lost)
    try:
        run(["/usr/bin/tether-station", "restore", str(archive), "--dir", str(STATION_DATA)])
        run(["chown", "-R", "tether-station:tether-station", str(STATION_DATA)])
        assert (STATION_DATA / "softhsm-tokens").is_dir(), "the token in the station directory came back with it"
        service, ports = started(tmp_path, "restored")
        try:
            cert_file, key_file = tmp_path / "dev.pem", tmp_path / "dev.key"
            cert_file.write_bytes(to_pem(chain))
            key_file.write_bytes(key_pem(key))  # type: ignore[arg-type]
            with EstClient(f"https://127.0.0.1:{ports['est']}", str(STATION_DATA / "ca.pem"),
                           auth=ClientCertAuth(str(cert_file), str(key_file))) as est:
                renewed = est.simplereenroll(build_csr(key, "pkg-hsm-dev", TRUST_DOMAIN))  # type: ignore[arg-type]
            renewed[0].verify_directly_issued_by(issuing)
            samples = scrape(ports["metrics"])
            assert samples[("tether_station_certificates", (("kind", "device"), ("state", "valid")))] == 2
        finally:
            assert service.stop() == 0, service.log.read_text()
    finally:
        shutil.rmtree(lost, ignore_errors=True)


def test_station_runs_from_the_package_as_its_user(installed_station_deb: Path) -> None:
    as_station = ["runuser", "-u", "tether-station", "--"]
    run([*as_station, "/usr/bin/tether-station", "init", "--dir", str(STATION_DATA), "--trust-domain",
         "factory.example"])
    for key in ("issuing.key", "root.key"):
        st = (STATION_DATA / key).stat()
        assert st.st_mode & 0o777 == 0o600 and st.st_uid == int(run(["id", "-u", "tether-station"]).stdout)
    otp = run([*as_station, "/usr/bin/tether-station", "otp", "pkg-dev", "--dir", str(STATION_DATA)]).stdout.strip()
    assert len(otp) >= 16


def test_station_deb_purge_keeps_the_ca_and_ledger_unless_asked(installed_station_deb: Path) -> None:
    ledger = STATION_DATA / "ledger.sqlite"
    if not ledger.exists():  # run alone: make the state a purge must keep
        run(["runuser", "-u", "tether-station", "--", "/usr/bin/tether-station", "init", "--dir", str(STATION_DATA)])
    key = (STATION_DATA / "issuing.key").read_bytes()
    done = run(["dpkg", "--purge", "tether-station"])
    assert "kept /var/lib/tether-station (the CA keys and the ledger)" in done.stderr
    assert not Path("/opt/tether-station").exists() and not Path("/usr/bin/tether-station").exists()
    assert not Path("/etc/tether/station.toml").exists()  # a conffile goes with purge
    assert (STATION_DATA / "issuing.key").read_bytes() == key, "purge touched the CA key without being asked"
    assert ledger.is_file()
    assert subprocess.run(["id", "tether-station"], capture_output=True, check=False).returncode == 0, \
        "the user that owns the kept files was removed"
    run(["dpkg", "-i", str(installed_station_deb)])
    assert (STATION_DATA / "issuing.key").read_bytes() == key, "reinstall lost the kept CA"
    run(["dpkg", "--purge", "tether-station"], env={**os.environ, "TETHER_STATION_PURGE_DATA": "1"})
    assert not STATION_DATA.exists()
    assert subprocess.run(["id", "tether-station"], capture_output=True, check=False).returncode != 0


# -- the wheel without the `station` extra ---------------------------------------------------------------------
def test_without_the_station_extra_the_console_is_one_line_and_est_keeps_serving(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", "-c", str(LOCK),
         str(dist / f"tether-{VERSION}-py3-none-any.whl")])
    assert subprocess.run([str(venv / "bin/python"), "-c", "import jinja2"], capture_output=True,
                          check=False).returncode != 0, "this venv must lack the station extra"
    station = tmp_path / "station"
    run([str(venv / "bin/tether-station"), "init", "--dir", str(station)])
    ports, log = tmp_path / "ports.json", tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(venv / "bin/tether-station"), "serve", "--dir", str(station), "--listen",
                                 "127.0.0.1:0", "--workers", "2", "--console", "127.0.0.1:0", "--metrics",
                                 "127.0.0.1:0", "--port-file", str(ports)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: ports.exists() or proc.poll() is not None, 60, "the station's port file",
                   describe=log.read_text)
        assert proc.poll() is None, log.read_text()
        est = json.loads(ports.read_text())
        assert set(est) == {"est"}, est  # neither the console nor the metrics opened a port
        ctx = ssl.create_default_context(cafile=str(station / "ca.pem"))
        with urllib.request.urlopen(f"https://127.0.0.1:{est['est']}/.well-known/est/cacerts", context=ctx,
                                    timeout=10) as answer:
            assert answer.status == 200
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "Traceback" not in text and "No module named" not in text, text
    lines = [line for line in text.splitlines() if " off: it needs " in line]
    assert len(lines) == 2, text
    assert lines[0].endswith("--console 127.0.0.1:0 off: it needs jinja2, segno (not installed; "
                             "pip install 'tether[station]'); EST enrollment is served without it"), lines
    assert lines[1].endswith("--metrics 127.0.0.1:0 off: it needs prometheus_client (not installed; "
                             "pip install 'tether[station]'); EST enrollment is served without it"), lines
