"""The bed that starts a packaged unit where no systemd runs (tests/packaging/unitbed.py) does what systemd
does with the parts the packaged-station test relies on: drop-ins in order, `Key=` clearing a list, and
READY=1 believed from the main process only (NotifyAccess=main)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.packaging.unitbed import NotifyService, unit_settings

# The main process has a child send READY=1 first, waits for it, then sends its own: systemd (and the bed)
# takes the start as done on the second one only.
NOTIFY = """import os, signal, socket, subprocess, sys
def send(text):
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(text.encode(), os.environ["NOTIFY_SOCKET"])
if len(sys.argv) > 1:
    send(sys.argv[1])
    sys.exit(0)
subprocess.run([sys.executable, __file__, "READY=1\\nSTATUS=from a child"], check=True)
send("READY=1\\nSTATUS=from main")
signal.pause()
"""


def write_unit(units: Path, dropins: Path, service: str, *conf: str) -> None:
    units.mkdir()
    (units / "bed.service").write_text(f"[Unit]\nDescription=bed\n\n[Service]\n{service}\n[Install]\nWantedBy=x\n")
    (dropins / "bed.service.d").mkdir(parents=True)
    for i, text in enumerate(conf):
        (dropins / "bed.service.d" / f"{i:02d}.conf").write_text(f"[Service]\n{text}\n")


def test_drop_ins_apply_in_order_and_an_empty_assignment_clears_a_list(tmp_path: Path) -> None:
    units, dropins = tmp_path / "lib", tmp_path / "etc"
    write_unit(units, dropins, "ExecStart=/bin/a --x\nEnvironment=A=1\nUser=one\n",
               "ExecStart=\nExecStart=/bin/b --y\nEnvironment=B=2\n", "User=two\n")
    settings = unit_settings("bed.service", units, dropins)
    assert settings["ExecStart"] == ["/bin/b --y"]
    assert settings["Environment"] == ["A=1", "B=2"]
    assert settings["User"] == ["two"]
    assert "WantedBy" not in settings and "Description" not in settings  # [Service] only


def test_ready_is_believed_from_the_main_process_only(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the bed starts units as their User=: run it as root (CI does)", pytrace=False)
    units, dropins = tmp_path / "lib", tmp_path / "etc"
    script = tmp_path / "notify.py"
    script.write_text(NOTIFY)
    command = f"{sys.executable} {script}"
    write_unit(units, dropins, f"Type=notify\nNotifyAccess=main\nUser=root\nGroup=root\nExecStart={command}\n")
    service = NotifyService("bed.service", tmp_path / "bed.log", units, dropins)
    try:
        assert service.start(timeout=60) == "from main", service.messages
        assert any("from a child" in text for _, text in service.messages)  # it came, and was not believed
    finally:
        service.stop()
