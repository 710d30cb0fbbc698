"""A SoftHSM2 token in a directory of its own: its config file, its token directory, one initialised token.

Everything SoftHSM2 reads is named by $SOFTHSM2_CONF (`env`), so parallel tests never share a token.
`key_uri` is the RFC 7512 URI a station is given; the user PIN sits in a 0600 file it names.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lab.procs import LabError

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class SoftHsm:
    def __init__(self, directory: Path, label: str = "tether-station", pin: str = "246810",
                 so_pin: str = "13579111") -> None:
        if shutil.which("softhsm2-util") is None or not Path(MODULE).exists():
            raise LabError("softhsm2-util or libsofthsm2.so is missing: install the Debian package softhsm2 "
                           "(scripts/install-deps.sh)")
        self.directory = Path(directory)
        self.tokens = self.directory / "tokens"
        self.tokens.mkdir(parents=True)
        self.conf = self.directory / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        self.label, self.pin = label, pin
        self.pin_file = self.directory / "pin"
        self.pin_file.write_text(pin + "\n")
        self.pin_file.chmod(0o600)
        run = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                              "--so-pin", so_pin], capture_output=True, text=True, check=False, env=self.env_full,
                             timeout=60)
        if run.returncode != 0:
            raise LabError(f"softhsm2-util --init-token failed: {run.stderr or run.stdout}")

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    @property
    def env_full(self) -> dict[str, str]:
        import os

        return {**os.environ, **self.env}

    def key_uri(self, object_prefix: str = "ca", pin_file: Path | None = None) -> str:
        return (f"pkcs11:token={self.label};object={object_prefix}?module-path={MODULE}"
                f"&pin-source={pin_file or self.pin_file}")
