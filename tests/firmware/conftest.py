"""Firmware tests: modules are imported the way the board sees them (firmware/ at the top level)."""

import os
import sys

from tests.firmware import micropython

# The board imports firmware modules at the top level, and the shared test helpers import each
# other the same way so they run unchanged in MicroPython.
for _path in (os.path.join(micropython.REPO, "firmware"), micropython.HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)
