"""Station fixtures: `tether-station serve` as a real subprocess on a loopback port it binds itself (port 0,
read back from `--port-file`), and a real PostgreSQL server for the shared ledger (started again on
another port if its port was taken). Both are waited for by polling with a deadline and stopped
afterwards; a missing PostgreSQL fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.procs import ADDRESS_IN_USE, AddressInUse, LabError, Proc, read_port_file, start_on_free_port, wait_until
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
    argv: Sequence[str] = field(default_factory=list)  # the `serve` options after --dir/--listen

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

    def restart(self, timeout: float = 20.0) -> None:
        """`serve` again with the same options on the same port: devices keep the URL they were given.
        The port is free between the crash and the restart: a client's outgoing connection can be given
        it as its source port for a moment, so a start that finds it taken is tried again until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.proc, _ = serve_station(self.directory, self.argv, self.port, self.proc.log)
                break
            except AddressInUse:
                if time.monotonic() > deadline:
                    raise
        wait_until(self.serving, timeout, f"tether-station serve back on port {self.port}",
                   describe=lambda: f"serve.log ends:\n{self.proc.tail()}")

    def serving(self) -> bool:
        """True when GET /cacerts answers 200 over verified TLS."""
        self.proc.check_alive()
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(f"{self.url}/.well-known/est/cacerts", context=ctx, timeout=2) as r:  # noqa: S310
                return r.status == 200
        except OSError:
            return False


def serve_station(directory: Path, argv: Sequence[str], port: int = 0, log: Path | None = None,
                  wrapper: Sequence[str] = ()) -> tuple[Proc, dict[str, int]]:
    """`[WRAPPER] tether-station serve --dir directory --listen 127.0.0.1:<port> ARGV`, and the ports it
    bound (`{"est": .., "console": ..}`). With port 0 the station binds one the kernel picks and says which
    in its `--port-file`; nothing else can take it in between."""
    port_file = directory / "serve.ports.json"
    port_file.unlink(missing_ok=True)
    proc = Proc("tether-station", [*wrapper, sys.executable, "-m", "provisioning.station.cli", "serve", "--dir",
                                   str(directory), "--listen", f"127.0.0.1:{port}", "--port-file", str(port_file),
                                   *argv], log or directory / "serve.log", cwd=REPO)
    try:
        return proc, read_port_file(port_file, proc)
    except BaseException:
        proc.stop()
        raise


def start_station(directory: Path, db: str | None = None, workers: int = 2,
                  extra: Sequence[str] = ()) -> RunningStation:
    """`extra`: more `serve` options (limits such as --request-timeout)."""
    argv = ["--workers", str(workers), "--log-level", "info", *extra, *(["--db", db] if db else [])]
    proc, ports = serve_station(directory, argv)
    station = RunningStation(directory, ports["est"], proc, db, argv)
    wait_until(station.serving, 20, f"tether-station serve on port {station.port}",
               describe=lambda: f"serve.log ends:\n{proc.tail()}")
    return station


@pytest.fixture
def station_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "station"
    station_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN)
    return directory


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[RunningStation]:
    """`tether-station serve` on `directory` for the block, stopped at its end."""
    running = start_station(directory)
    try:
        yield running
    finally:
        running.proc.stop()


@pytest.fixture
def station(station_dir: Path) -> Iterator[RunningStation]:
    with serving(station_dir) as running:
        yield running


# -- PostgreSQL --------------------------------------------------------------------------------------------
def _as_postgres(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class PgCluster:
    """A throwaway PostgreSQL 15 cluster: data and socket in a temp directory, TCP on loopback."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl"):
            if not (PG_BIN / tool).exists():
                pytest.fail(f"{PG_BIN / tool} is missing: install the Debian package postgresql-15", pytrace=False)
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            pytest.fail("runuser is missing (util-linux): needed to run PostgreSQL as the postgres user",
                        pytrace=False)
        # pytest's tmp_path sits under a root-only 0700 directory the postgres user cannot enter
        self.base = Path(tempfile.mkdtemp(prefix="tether-pg-"))
        self.data, self.sock = self.base / "data", self.base / "sock"
        self.port = 0
        self.sock.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
        run = subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "tether", "-A",
                                           "trust", "--no-sync"]), capture_output=True, text=True, check=False,
                             timeout=60)
        if run.returncode != 0:
            pytest.fail(f"initdb failed: {run.stderr}", pytrace=False)

    @property
    def url(self) -> str:
        return f"postgresql://tether@127.0.0.1:{self.port}/postgres"

    def log(self, port: int) -> Path:
        return self.base / f"pg-{port}.log"

    def start(self, ports: Iterable[int] | None = None) -> str:
        """Start and wait until it takes connections; on another port when its port was taken. The URL."""
        self.port = start_on_free_port(self._start_on, "PostgreSQL", ports)
        import psycopg

        def ready() -> bool:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                return False

        wait_until(ready, 20, f"PostgreSQL on port {self.port}",
                   describe=lambda: self.log(self.port).read_text(errors="replace")[-2000:])
        return self.url

    def _start_on(self, port: int) -> int:
        options = f"-p {port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        run = subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log(port)),
                                           "-o", options, "-w", "-t", "30", "start"]),
                             capture_output=True, text=True, check=False, timeout=60)
        if run.returncode != 0:  # pg_ctl -w waits for the server's own "ready" or its exit
            text = self.log(port).read_text(errors="replace") if self.log(port).exists() else ""
            error = AddressInUse if ADDRESS_IN_USE in text else LabError
            raise error(f"pg_ctl start on port {port} failed: {run.stderr}\n{text}")
        return port

    def remove(self) -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, check=False, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL 15 cluster on a loopback port (socket in its own directory); yields its URL."""
    cluster = PgCluster()
    try:
        try:
            url = cluster.start()
        except LabError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield url
    finally:
        cluster.remove()
