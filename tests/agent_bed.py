"""A provisioned device and the `tether run` process, for runtime tests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.config import load
from agent.identity import DeviceIdentity
from lab.procs import Proc, wait_until
from tests.conftest import REPO, run_tether, write_config
from tests.pki import Pki


def provisioned_device(tmp_path: Path, pki: Pki, device_id: str = "dev-001", **sections: Any) -> Path:
    """A device config with a key and an installed chain from `pki`."""
    sections.setdefault("identity", {"ca_file": str(pki.root_file)})
    sections.setdefault("mqtt", {"backoff_base": 0.2, "backoff_cap": 1.0, "connect_timeout": 3.0})
    config = write_config(tmp_path / device_id, device_id, **sections)
    made = run_tether("keygen", config=config)
    assert made.returncode == 0, made.stderr
    identity = DeviceIdentity(load(config))
    identity.install_chain(pki.device_chain(identity.keystore.public_key("device"), device_id))
    return config


class Agent:
    """`tether run` in a child process; its status file is polled, never slept on."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.state = Path(load(config).state_dir)
        self.proc = Proc("tether-run", [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                         config.parent / "agent.log", env={**(env or {}), "PYTHONPATH": str(REPO)}, cwd=REPO)

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state / "status.json").read_text()))
        except (OSError, ValueError):
            return {}

    def wait_status(self, timeout: float = 20.0, **expected: Any) -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            self.proc.check_alive()
            status = self.status()
            return status if all(status.get(k) == v for k, v in expected.items()) else None
        result = wait_until(matches, timeout, f"agent status {expected}",
                            describe=lambda: f"status.json {self.status()}; log ends:\n{self.proc.tail(30)}")
        return dict(result)  # type: ignore[call-overload]

    def log(self) -> str:
        return self.proc.log.read_text(errors="replace") if self.proc.log.exists() else ""

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.popen.terminate()
        return self.proc.popen.wait(timeout)

    def stop(self) -> None:
        self.proc.stop()


def env_without_notify() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
