"""The installed agent's first boot uses the attested-enrollment beds: swtpm TPMs made by swtpm's local CA and
a station that trusts it (tests/attest/conftest.py). The wheel and sdist are built once for every module here
(the .deb tests on this host and in the systemd machine, nspawnbed.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.attest.conftest import attest_station, attested_tpm, ek_ca, tpm_maker, tpm_states  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(["bash", str(REPO / "scripts/build-dist.sh"), str(out)], capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, f"scripts/build-dist.sh exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return out
