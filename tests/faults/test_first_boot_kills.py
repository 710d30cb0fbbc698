"""kill -9 the agent at random points of first boot, 50 times: every device still ends with one key,
one chain matching it and one ledger row at the station."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.config import load
from agent.identity import DeviceIdentity
from lab.mosquitto import Mosquitto
from lab.procs import Proc
from provisioning.certs import load_certificates
from tests.agent_bed import Agent
from tests.conftest import REPO, run_tether
from tests.integration.test_first_boot import device_config
from tests.station.conftest import RunningStation

DEVICES, KILLS_EACH = 25, 2  # 50 kills


def where(state: Path) -> str:
    """The step a kill interrupted, from what the boot sequence recorded before acting."""
    try:
        boot = json.loads((state / "boot.json").read_text())
    except (OSError, ValueError):
        return "before any state" if not (state / "keys").exists() else "key (before boot.json)"
    return f"{boot.get('step')}/{boot.get('state')}"


def first_boot_seconds(tmp_path: Path, station: RunningStation, broker: Mosquitto) -> float:
    config = device_config(tmp_path, station, broker, "dev-ref")
    started = time.monotonic()
    agent = Agent(config)
    try:
        agent.wait_status(session="online", timeout=30)
    finally:
        agent.stop()
    return time.monotonic() - started


def test_kill_9_at_50_random_points_of_first_boot_leaves_one_key_one_chain_one_ledger_row(
        tmp_path: Path, station: RunningStation, station_broker: Mosquitto) -> None:
    span = first_boot_seconds(tmp_path, station, station_broker) * 1.3
    rng = random.Random(8)
    delays = [[rng.uniform(0.0, span) for _ in range(KILLS_EACH)] for _ in range(DEVICES)]

    def one_device(n: int) -> list[str]:
        device_id = f"dev-k{n:02d}"
        config = device_config(tmp_path, station, station_broker, device_id)
        state = Path(load(config).state_dir)
        hit = []
        for delay in delays[n]:
            proc = Proc("tether-run", [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                        tmp_path / f"{device_id}.log", cwd=REPO)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(delay)
            proc.kill()  # SIGKILL to the process group, as a power cut would
            hit.append(where(state))
        resumed = run_tether("check", config=config)
        assert resumed.returncode == 0, f"{device_id}: {resumed.stdout}{resumed.stderr}"
        keys = sorted(k.name for k in (state / "keys").iterdir())
        assert keys == ["device.key.pem"], f"{device_id}: one key, no leftovers: {keys}"
        assert DeviceIdentity(load(config)).chain_problems() == [], f"{device_id}: chain matches the key"
        rows = station.rows(device_id)
        assert len(rows) == 1, f"{device_id}: {len(rows)} ledger rows"
        leaf = load_certificates((state / "certs" / "chain.pem").read_bytes())[0]
        assert format(leaf.serial_number, "x") == rows[0].serial, f"{device_id}: the stored leaf is the ledger's"
        return hit

    with ThreadPoolExecutor(3) as pool:
        hits = [step for steps in pool.map(one_device, range(DEVICES)) for step in steps]
    seen = Counter(hits)
    print(f"\nFIGURES first-boot-kill-9: kills={len(hits)}, devices={DEVICES}, all enrolled with one key, "
          f"one chain, one ledger row; kills by step: {dict(sorted(seen.items()))}")
    assert len(hits) == DEVICES * KILLS_EACH
