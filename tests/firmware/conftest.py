"""Firmware tests: modules are imported the way the board sees them (firmware/ at the top level),
and the deployments the board tests run on are made once per session."""

import os
import sys
import time

import pytest

from tests.firmware import micropython, unix_port

# The board imports firmware modules at the top level, and the shared test helpers import each
# other the same way so they run unchanged in MicroPython.
for _path in (os.path.join(micropython.REPO, "firmware"), micropython.HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# The deployments the network and config tests run on: the .mpy files on the PyPI port (what a
# developer copies) and the firmware frozen into a 32-bit build (what a board runs). The cycle
# test that holds the budgets runs on every deployment (unix_port.DEPLOYMENTS).
BOARD_DEPLOYMENTS = ("mpy-64", "frozen-32")


@pytest.fixture(scope="session")
def deployments(tmp_path_factory):
    """``get(name)``: that unix_port.Deployment, made once per session (vendored ports built or
    taken from the cache; the time it took is printed)."""
    made = {}

    def get(name):
        if name not in made:
            started = time.monotonic()
            made[name] = unix_port.deployment(name, tmp_path_factory.mktemp(name))
            print(f"\n{name}: ready in {time.monotonic() - started:.1f} s", end=" ")
        return made[name]

    return get


@pytest.fixture(params=BOARD_DEPLOYMENTS)
def deploy(request, deployments):
    return deployments(request.param)
