"""A software TPM test bed: swtpm behind tpm2-abrmd on a private D-Bus session bus.

The resource manager is required (DESIGN.md "Keys"): straight to swtpm the TPM's three transient
slots fill up and TLS fails with "out of memory for object contexts". Each bed gets its own bus,
so parallel tests do not share a TPM.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from lab.procs import LabError, Proc, start_on_free_port, wait_until


class EkCa:
    """swtpm's local CA (`swtpm_localca`) in its own directory: the "TPM maker" of test TPMs.

    `manufacture(state)` does what a maker's line does: `swtpm_setup --create-ek-cert
    --create-platform-cert` makes the TPM's RSA 2048 and ECC EKs (persistent at 0x81010001 and, with
    swtpm 0.7, P-384 at 0x81010016) and writes their certificates, signed by this CA, into NV.
    `roots_pem` is what a station that trusts this maker is given (root and issuing CA).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        ca = self.directory / "ca"
        ca.mkdir(exist_ok=True)
        self.localca_conf = self.directory / "swtpm-localca.conf"
        self.localca_conf.write_text(f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
                                     f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n")
        options = self.directory / "swtpm-localca.options"
        options.write_text("--platform-manufacturer Tether\n--platform-version 2.1\n--platform-model swtpm\n")
        self.setup_conf = self.directory / "swtpm_setup.conf"
        self.setup_conf.write_text(f"create_certs_tool = /usr/bin/swtpm_localca\n"
                                   f"create_certs_tool_config = {self.localca_conf}\n"
                                   f"create_certs_tool_options = {options}\nactive_pcr_banks = sha256\n")
        self.ca = ca

    def manufacture(self, state: Path, timeout: float = 120.0) -> None:
        """Give the TPM state in `state` its EKs and EK certificates (the first call also makes the CA)."""
        state.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
                              "--create-platform-cert", "--config", str(self.setup_conf), "--overwrite"],
                             capture_output=True, text=True, check=False, timeout=timeout)
        if out.returncode != 0:
            raise LabError(f"swtpm_setup failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")

    @property
    def roots_pem(self) -> bytes:
        return (self.ca / "swtpm-localca-rootca-cert.pem").read_bytes() + (self.ca / "issuercert.pem").read_bytes()


class SoftTpm:
    """swtpm + dbus-daemon + tpm2-abrmd; `tcti` is what the key store and tpm2-openssl use."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.procs: list[Proc] = []
        self.env: dict[str, str] = {}
        self.tcti = "tabrmd:bus_type=session"
        self.port = 0

    def start(self, timeout: float = 15.0, ports: Iterable[int] | None = None) -> SoftTpm:
        """Start swtpm, the bus and the resource manager; wait until a TPM command goes through.

        swtpm listens on `port` (commands) and `port + 1` (control); when another process holds either,
        it is started again on other ports. `ports`: the ports to try instead of the kernel's picks.
        """
        (self.directory / "state").mkdir(parents=True, exist_ok=True)
        self.procs.append(start_on_free_port(lambda port: self._swtpm(port, timeout), "swtpm", ports))
        out = subprocess.run(["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=1"],
                             capture_output=True, text=True, check=False, timeout=timeout)
        if out.returncode != 0:
            raise LabError(f"dbus-daemon failed to start: {out.stderr.strip()}")
        address, pid = out.stdout.split()[:2]
        self.dbus_pid = int(pid)
        self.env = {"DBUS_SESSION_BUS_ADDRESS": address, "TPM2OPENSSL_TCTI": self.tcti,
                    "TPM2TOOLS_TCTI": self.tcti}
        abrmd = Proc("tpm2-abrmd", ["tpm2-abrmd", "--session", "--allow-root",
                                    f"--tcti=swtpm:host=127.0.0.1,port={self.port}"],
                     self.directory / "logs" / "abrmd.log", env=self.env)
        self.procs.append(abrmd)
        wait_until(lambda: self._abrmd_ready(abrmd, timeout), timeout, "tpm2-abrmd on the session bus",
                   describe=lambda: f"tpm2-abrmd log ends:\n{abrmd.tail()}")
        return self

    def _swtpm(self, port: int, timeout: float) -> Proc:
        pidfile = self.directory / "swtpm.pid"
        pidfile.unlink(missing_ok=True)
        swtpm = Proc("swtpm", ["swtpm", "socket", "--tpmstate", f"dir={self.directory / 'state'}", "--tpm2",
                               "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                               "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                               "--flags", "not-need-init,startup-clear", "--pid", f"file={pidfile}"],
                     self.directory / "logs" / "swtpm.log")

        def listening() -> bool:  # swtpm writes its pid file once both sockets listen
            if pidfile.exists():
                return True
            swtpm.check_alive()  # AddressInUse: "Could not open TCP socket: Address already in use"
            return False
        try:
            wait_until(listening, timeout, f"swtpm on ports {port} and {port + 1}",
                       describe=lambda: f"swtpm log ends:\n{swtpm.tail()}")
        except BaseException:
            swtpm.stop()
            raise
        self.port = port
        return swtpm

    def _abrmd_ready(self, abrmd: Proc, timeout: float) -> bool:
        abrmd.check_alive()
        probe = subprocess.run(["tpm2_getrandom", "--hex", "4"], capture_output=True, check=False,
                               env={**os.environ, **self.env}, timeout=timeout)
        return probe.returncode == 0

    def apply_env(self) -> None:
        """Put the bus address and TCTI into this process's environment (tpm2-pytss reads them)."""
        os.environ.update(self.env)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if getattr(self, "dbus_pid", 0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.dbus_pid, 15)
            self.dbus_pid = 0

    def __enter__(self) -> SoftTpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
