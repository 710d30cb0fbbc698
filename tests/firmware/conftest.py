"""Firmware tests: modules are imported the way the board sees them (firmware/ at the top level)."""

import os
import sys

from tests.firmware import micropython

_FIRMWARE = os.path.join(micropython.REPO, "firmware")
if _FIRMWARE not in sys.path:
    sys.path.insert(0, _FIRMWARE)
