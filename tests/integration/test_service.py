"""The boot-time service contract: sd_notify READY=1 once online, WATCHDOG=1 while healthy, a clean
stop on SIGTERM, and a start-up path that imports neither cryptography, requests nor tpm2-pytss."""

from __future__ import annotations

import contextlib
import re
import socket
import sys
from pathlib import Path

from lab.mosquitto import Mosquitto
from lab.procs import Proc, wait_until
from tests.agent_bed import provisioned_device
from tests.conftest import REPO
from tests.pki import Pki
from tests.unit.test_startup import NOT_AT_START


def test_notify_ready_when_online_then_watchdog_then_stopping(tmp_path: Path, pki: Pki, broker: Mosquitto) -> None:
    config = provisioned_device(tmp_path, pki, endpoints={"urls": [f"mqtts://localhost:{broker.port}"]},
                                token={"enabled": False})
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.2)
    messages: list[str] = []

    def received(text: str) -> bool:
        with contextlib.suppress(TimeoutError):
            messages.append(sock.recv(4096).decode())
        return any(text in m for m in messages)

    proc = Proc("tether-run", [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                tmp_path / "run.log", cwd=REPO, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"})
    try:
        wait_until(lambda: received("READY=1"), 20, "READY=1")
        wait_until(lambda: received("WATCHDOG=1"), 5, "WATCHDOG=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert f"online via mqtts://localhost:{broker.port}" in ready
        proc.popen.terminate()
        assert proc.popen.wait(10) == 0
        wait_until(lambda: received("STOPPING=1"), 5, "STOPPING=1")
    finally:
        proc.stop()
        sock.close()


def test_start_up_path_imports_only_paho_and_the_standard_library(tmp_path: Path, pki: Pki,
                                                                   broker: Mosquitto) -> None:
    config = provisioned_device(tmp_path, pki, endpoints={"urls": [f"mqtts://localhost:{broker.port}"]},
                                token={"enabled": False})
    proc = Proc("tether-run", [sys.executable, "-X", "importtime", "-m", "agent.cli", "--config", str(config), "run"],
                tmp_path / "run.log", cwd=REPO)
    try:
        wait_until(lambda: "session: connected" in (tmp_path / "run.log").read_text(), 20, "the session")
        proc.popen.terminate()
        proc.popen.wait(10)
    finally:
        proc.stop()
    imported = set(re.findall(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", (tmp_path / "run.log").read_text()))
    assert "paho.mqtt.client" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("cryptography", "requests", "tpm2_pytss", "urllib3"))
    assert heavy == [], f"the start-up path imported {heavy}"
    unneeded = sorted(imported & set(NOT_AT_START))  # issue 24: what `tether run` never runs before CONNACK
    assert unneeded == [], f"the start-up path imported {unneeded}"


# `tether` as pyproject installs it (agent.entry:main), with a collector callback that notes every collection
# made before start-up froze what it built
TETHER_WATCHING_GC = r'''
import gc, sys
from agent.entry import main
early = []  # collections from main() on, before start-up froze what it built
gc.callbacks.append(lambda phase, info: phase == "start" and not gc.get_freeze_count() and early.append(info))
sys.argv = ["tether", *sys.argv[1:]]
code = main()
print(f"collector: enabled {gc.isenabled()}, frozen {gc.get_freeze_count()}, collections during start-up {early}",
      file=sys.stderr)
sys.exit(code)
'''


def test_tether_run_starts_without_collections_and_freezes_what_it_built(tmp_path: Path, pki: Pki,
                                                                          broker: Mosquitto) -> None:
    # issue 24: start-up makes objects that live as long as the process; collecting over them while they are
    # made frees nothing, and once frozen no later collection looks at them: the work is gone, not postponed
    config = provisioned_device(tmp_path, pki, endpoints={"urls": [f"mqtts://localhost:{broker.port}"]},
                                token={"enabled": False})
    proc = Proc("tether-run", [sys.executable, "-c", TETHER_WATCHING_GC, "--config", str(config), "run"],
                tmp_path / "run.log", cwd=REPO)
    try:
        wait_until(lambda: "session: connected" in (tmp_path / "run.log").read_text(), 20, "the session")
        proc.popen.terminate()
        assert proc.popen.wait(10) == 0
    finally:
        proc.stop()
    line = next(x for x in (tmp_path / "run.log").read_text().splitlines() if x.startswith("collector:"))
    enabled, frozen, early = re.fullmatch(r"collector: enabled (\w+), frozen (\d+), collections during start-up (.*)",
                                          line).groups()  # type: ignore[union-attr]
    assert (enabled, early) == ("True", "[]") and int(frozen) > 10_000, line
