"""Console fixtures: a real `tether-station serve --console`, operators, and headless Chromium holding an
operator's client certificate.

How the browser presents its certificate without a dialog (documented in docs/console.md):
- Chromium on Linux reads client certificates from the NSS database in `$HOME/.pki/nssdb`; each browser
  gets its own HOME with an NSS database holding one operator's PKCS#12 (pk12util) and the station's
  root as a trusted CA (certutil -t C,,), so the console's HTTPS certificate verifies for real.
- The policy AutoSelectCertificateForUrls, in a managed policy file under /etc/chromium/policies/managed/,
  makes Chromium pick the certificate issued by the operator CA for https://127.0.0.1:* instead of
  asking. The file is the same for every test (which certificate is picked depends on the HOME).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.procs import wait_until
from tests.conftest import REPO
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import RunningStation, serve_station, station_cli

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
POLICY_DIR = Path("/etc/chromium/policies/managed")
POLICY_FILE = POLICY_DIR / "tether-console-tests.json"
OPERATOR_ORG = "Tether station console"  # provisioning.station.console.operators.OPERATOR_ORG
SCREENSHOTS = REPO / "docs" / "console"
P12_PASSWORD = "console-test-p12"


@dataclass
class ConsoleStation(RunningStation):
    console_port: int = 0

    @property
    def console_url(self) -> str:
        return f"https://127.0.0.1:{self.console_port}"

    def operator(self, name: str, role: str, out: Path) -> Operator:
        password_file = out.parent / f"{name}.p12pass"
        out.parent.mkdir(parents=True, exist_ok=True)
        password_file.write_text(P12_PASSWORD + "\n")
        self.cli("operator", "add", name, "--role", role, "--out", str(out), "--p12-passphrase-file",
                 str(password_file))
        return Operator(name, role, out / f"{name}.p12", out / f"{name}.pem", out / f"{name}.key",
                        out / "station-ca.pem")

    def console_ready(self) -> bool:
        """The console's TLS port answers (and refuses us without a certificate, as it must)."""
        self.proc.check_alive()
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            urllib.request.urlopen(f"{self.console_url}/live", context=ctx, timeout=2)  # noqa: S310
        except OSError as exc:  # TLS 1.3: the refusal arrives as an alert after the client's handshake
            return "certificate required" in str(exc).lower()
        return False


@dataclass
class Operator:
    name: str
    role: str
    p12: Path
    cert: Path
    key: Path
    station_ca: Path

    def curl(self, url: str, *args: str) -> subprocess.CompletedProcess[str]:
        """curl with this operator's certificate; `-w` prints the status on the last line."""
        return subprocess.run(["curl", "-sS", "--cacert", str(self.station_ca), "--cert", str(self.cert),
                               "--key", str(self.key), "-w", "\n%{http_code}", *args, url],
                              capture_output=True, text=True, timeout=30, check=False)


def start_console_station(directory: Path, db: str | None = None) -> ConsoleStation:
    argv = ["--workers", "1", "--console", "127.0.0.1:0", "--log-level", "info", *(["--db", db] if db else [])]
    proc, ports = serve_station(directory, argv)
    station = ConsoleStation(directory, ports["est"], proc, db, argv, console_port=ports["console"])
    wait_until(station.serving, 30, f"tether-station serve on port {station.port}")
    wait_until(station.console_ready, 30, f"console on port {station.console_port}")
    return station


@pytest.fixture(scope="module")
def console_station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStation]:
    directory = tmp_path_factory.mktemp("console") / "station"
    station_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN)
    running = start_console_station(directory)
    try:
        yield running
    finally:
        running.proc.stop()


@pytest.fixture(scope="module")
def admin(console_station: ConsoleStation, tmp_path_factory: pytest.TempPathFactory) -> Operator:
    return console_station.operator("alice", "admin", tmp_path_factory.mktemp("alice") / "out")


@pytest.fixture(scope="module")
def readonly(console_station: ConsoleStation, tmp_path_factory: pytest.TempPathFactory) -> Operator:
    return console_station.operator("bob", "readonly", tmp_path_factory.mktemp("bob") / "out")


# -- the browser -----------------------------------------------------------------------------------------
def _require(path: str, package: str) -> None:
    if not Path(path).exists():
        pytest.fail(f"{path} is missing: install the Debian package {package} (scripts/install-deps.sh)",
                    pytrace=False)


def install_policy() -> None:
    """Let Chromium pick the operator certificate for the console without a dialog."""
    if os.geteuid() != 0:
        pytest.fail(f"the browser tests write the Chromium policy {POLICY_FILE} and need root", pytrace=False)
    rule = {"pattern": "https://127.0.0.1:*", "filter": {"ISSUER": {"O": OPERATOR_ORG}}}
    wanted = json.dumps({"AutoSelectCertificateForUrls": [json.dumps(rule)]}, indent=1) + "\n"
    if not POLICY_FILE.exists() or POLICY_FILE.read_text() != wanted:
        POLICY_DIR.mkdir(parents=True, exist_ok=True)
        tmp = POLICY_FILE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(wanted)
        os.replace(tmp, POLICY_FILE)


def nss_home(home: Path, operator: Operator) -> Path:
    """A HOME whose ~/.pki/nssdb holds the operator's key and certificate and trusts the station root."""
    _require("/usr/bin/certutil", "libnss3-tools")
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    for argv in (["certutil", "-N", "-d", f"sql:{db}", "--empty-password"],
                 ["pk12util", "-i", str(operator.p12), "-d", f"sql:{db}", "-W", P12_PASSWORD],
                 ["certutil", "-A", "-d", f"sql:{db}", "-n", "tether-station-root", "-t", "C,,",
                  "-i", str(operator.station_ca)]):
        run = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if run.returncode != 0:
            pytest.fail(f"{' '.join(argv)} failed: {run.stdout}{run.stderr}", pytrace=False)
    return home


Browser = Callable[[Operator], object]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Callable[[Operator], object]]:
    """browser(operator) -> a Selenium Chrome driver (headless Chromium) holding that operator's certificate."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _require(CHROMIUM, "chromium")
    _require(CHROMEDRIVER, "chromium-driver")
    install_policy()
    drivers = []

    def launch(operator: Operator) -> object:
        home = nss_home(tmp_path / f"home-{operator.name}-{len(drivers)}", operator)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={home / 'profile'}"):
            options.add_argument(flag)
        service = Service(CHROMEDRIVER, env={"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                          log_output=str(tmp_path / f"chromedriver-{operator.name}.log"))
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(60)
        drivers.append(driver)
        return driver

    try:
        yield launch
    finally:
        for d in drivers:
            d.quit()
        shutil.rmtree(tmp_path / "homes", ignore_errors=True)


def screenshot(driver: object, name: str) -> None:
    """Save the page as docs/console/NAME.png (the screenshots docs/console.md shows)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))  # type: ignore[attr-defined]
