"""Station fixtures: `tether-station serve` as a real subprocess on a free loopback port, and a real
PostgreSQL server for the shared ledger. Both are waited for by polling with a deadline and stopped
afterwards; a missing PostgreSQL fails loudly.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.procs import Proc, free_port, wait_until
from provisioning.station.ledger import Ledger, Row
from tests.conftest import REPO
from tests.pki import TRUST_DOMAIN

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def station_cli(*args: str, env: dict[str, str] | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `tether-station` (the console script's module) in a child process."""
    out = subprocess.run([sys.executable, "-m", "provisioning.station.cli", *args], capture_output=True, text=True,
                         timeout=timeout, check=False, cwd=REPO, env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise AssertionError(f"tether-station {' '.join(args)} exited {out.returncode}:\n{out.stderr}")
    return out


@dataclass
class RunningStation:
    directory: Path
    port: int
    proc: Proc
    db: str | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        db = ["--db", self.db] if self.db else []
        return station_cli(*args, "--dir", str(self.directory), *db, check=check)

    def otp(self, device_id: str, ttl: int | None = None) -> str:
        extra = ["--ttl", str(ttl)] if ttl is not None else []
        return self.cli("otp", device_id, *extra).stdout.strip()

    def ledger(self) -> Ledger:
        return Ledger(self.db or self.directory / "ledger.sqlite")

    def rows(self, device_id: str) -> list[Row]:
        ledger = self.ledger()
        try:
            return [r for r in ledger.rows("device") if r.device_id == device_id]
        finally:
            ledger.close()

    def serving(self) -> bool:
        """True when GET /cacerts answers 200 over verified TLS."""
        self.proc.check_alive()
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(f"{self.url}/.well-known/est/cacerts", context=ctx, timeout=2) as r:  # noqa: S310
                return r.status == 200
        except OSError:
            return False


def start_station(directory: Path, db: str | None = None, workers: int = 2,
                  extra: Sequence[str] = ()) -> RunningStation:
    """`extra`: more `serve` options (limits such as --request-timeout)."""
    port = free_port()
    argv = [sys.executable, "-m", "provisioning.station.cli", "serve", "--dir", str(directory),
            "--listen", f"127.0.0.1:{port}", "--workers", str(workers), "--log-level", "info", *extra]
    if db:
        argv += ["--db", db]
    proc = Proc("tether-station", argv, directory / "serve.log", cwd=REPO)
    station = RunningStation(directory, port, proc, db)
    wait_until(station.serving, 20, f"tether-station serve on port {port}")
    return station


@pytest.fixture
def station_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "station"
    station_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN)
    return directory


@pytest.fixture
def station(station_dir: Path) -> Iterator[RunningStation]:
    running = start_station(station_dir)
    try:
        yield running
    finally:
        running.proc.stop()


# -- PostgreSQL --------------------------------------------------------------------------------------------
def _as_postgres(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL 15 cluster on a free port (socket in its own directory); yields its URL."""
    for tool in ("initdb", "pg_ctl"):
        if not (PG_BIN / tool).exists():
            pytest.fail(f"{PG_BIN / tool} is missing: install the Debian package postgresql-15", pytrace=False)
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.fail("runuser is missing (util-linux): needed to run PostgreSQL as the postgres user", pytrace=False)
    # pytest's tmp_path sits under a root-only 0700 directory the postgres user cannot enter
    base = Path(tempfile.mkdtemp(prefix="tether-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    run = subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "tether", "-A", "trust",
                                       "--no-sync"]), capture_output=True, text=True, check=False, timeout=60)
    if run.returncode != 0:
        pytest.fail(f"initdb failed: {run.stderr}", pytrace=False)
    port = free_port()
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    run = subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"),
                                       "-o", options, "-w", "-t", "30", "start"]),
                         capture_output=True, text=True, check=False, timeout=60)
    if run.returncode != 0:
        log = (base / "pg.log").read_text(errors="replace") if (base / "pg.log").exists() else ""
        pytest.fail(f"pg_ctl start failed: {run.stderr}\n{log}", pytrace=False)
    try:
        url = f"postgresql://tether@127.0.0.1:{port}/postgres"
        import psycopg

        def ready() -> bool:
            try:
                with psycopg.connect(url, connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                return False

        wait_until(ready, 20, f"PostgreSQL on port {port}")
        yield url
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, check=False, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
