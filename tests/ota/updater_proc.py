"""The OTA updater as its own process, so tests can cut its power (SIGKILL) at a chosen moment.

    python -m tests.ota.updater_proc CONFIG run LINE   boot, session up, run the operation, exit when idle
    python -m tests.ota.updater_proc CONFIG boot       boot (start the commit deadline), then wait forever

`PAUSE_AT=install` makes the slot backend's install hang after writing part of the slot, so the test
can kill the process in the middle of an install. Progress is shown through files next to the config:
`published.txt` (one SmartREST line per line), `marker` (the moment to kill), `restart-requested`.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from agent import config as configmod
from agent.ota.agent import OtaAgent
from tests.ota.conftest import make_token
from tests.ota.driver import LoopUpdater


def main() -> int:
    config_path, mode = Path(sys.argv[1]), sys.argv[2]
    here = config_path.parent
    config = configmod.load(config_path)
    key_pem = (here / "token.key").read_bytes()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_pem, None)

    def publish(line: str) -> None:
        with open(here / "published.txt", "a") as fh:
            fh.write(line + "\n")

    def restart() -> None:
        (here / "restart-requested").touch()

    agent = LoopUpdater(config, lambda call_soon: OtaAgent(config, publish, lambda: make_token(key), restart,
                                                          call_soon=call_soon))
    if os.environ.get("PAUSE_AT") == "install":
        cls = type(agent.slots)

        def hang(self: object, slot: str, name: str, version: str) -> None:
            # Half an install: the slot is emptied and has a partial file, then the power goes.
            stage = agent.slots.stage(slot)
            partial = stage.parent / ("partial-" + stage.name)
            partial.write_bytes(b"half")
            (here / "marker").touch()
            threading.Event().wait()

        cls.install = hang  # type: ignore[method-assign]
    print(agent.on_boot(), flush=True)
    if mode == "boot":
        (here / "marker").touch()
        threading.Event().wait()
    agent.on_session_up()
    agent.on_operation(sys.argv[3])
    agent.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
