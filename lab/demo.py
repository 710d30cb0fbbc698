"""The demo: from a fresh machine to a provisioned, connected, updating device, with a timeline.

    python -m lab.demo [--tpm] [--keep DIR]

Starts the lab (station, two brokers, discovery, token service, artifact server), issues a one-time
password, boots `tether run` through first boot, enrollment, discovery and an mTLS session, waits
for two token refreshes, then (when OTA is available) publishes a signed release and waits for the
device to install and commit it. Exit code 0 only if every step happened. Cleans up after itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.runtime import RESTART_EXIT
from hal import TetherError
from lab.core import REPO, Lab, LabSettings
from lab.ota import publish_release, send_update
from lab.procs import LabError, Proc
from lab.swtpm import SoftTpm

TOKEN_LIFETIME = 4.0


class Supervisor:
    """Runs `tether run` the way systemd's `Restart=on-failure` would: started again when it exits
    asking for a restart (after an update switched slots), a failure otherwise."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.argv, self.log, self.env = argv, log, env
        self.restarts = 0
        self.proc = self._start()

    def _start(self) -> Proc:
        return Proc("tether-run", self.argv, self.log, env=self.env, cwd=REPO)

    def poll(self) -> None:
        code = self.proc.popen.poll()
        if code == RESTART_EXIT:
            self.restarts += 1
            self.proc = self._start()
        elif code is not None:
            raise LabError(f"tether run exited with {code}:\n{self.proc.tail(20)}")

    def tail(self, lines: int) -> str:
        return self.proc.tail(lines)

    def stop(self) -> None:
        self.proc.stop()


class Timeline:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last = self.start
        self.steps: list[tuple[str, bool]] = []
        self.supervisor: Supervisor | None = None

    def step(self, name: str, detail: str, ok: bool = True) -> None:
        now = time.monotonic()
        mark = "ok  " if ok else "FAIL"
        print(f"  {now - self.start:6.2f} s  (+{now - self.last:5.2f})  {mark}  {name:<12} {detail}", flush=True)
        self.last = now
        self.steps.append((name, ok))

    def wait(self, name: str, predicate: Callable[[], Any], timeout: float, detail: Callable[[Any], str]) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.supervisor is not None:
                self.supervisor.poll()
            value = predicate()
            if value:
                self.step(name, detail(value))
                return value
            time.sleep(0.02)  # polling the device's state files; the deadline bounds it
        self.step(name, f"did not happen within {timeout:.0f} s", ok=False)
        raise LabError(f"demo step {name!r} did not happen")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_demo(workdir: Path, use_tpm: bool) -> int:
    line = Timeline()
    tpm = agent = None
    print(f"Tether demo in {workdir}\n", flush=True)
    lab = Lab(workdir / "lab", LabSettings(brokers=2, token_lifetime=TOKEN_LIFETIME))
    try:
        lab.start()
        line.step("lab", f"station {lab.station_url}, brokers {', '.join(lab.broker_urls)}, discovery, tokens, "
                  "artifacts")
        env: dict[str, str] = {}
        tcti = None
        if use_tpm:
            tpm = SoftTpm(workdir / "tpm").start()
            env, tcti = dict(tpm.env), tpm.tcti
            line.step("tpm", "swtpm behind tpm2-abrmd on a private D-Bus bus")
        config = lab.device("demo-device-1", tpm_tcti=tcti)
        state = config.parent / "state"
        line.step("otp", f"one-time password issued for demo-device-1 ({config.parent / 'otp'})")
        agent = Supervisor([sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                           workdir / "agent.log", env)
        line.supervisor = agent
        line.wait("key", lambda: any((state / "keys").glob("device.*")) if (state / "keys").exists() else None,
                  20, lambda _: f"{'TPM (non-exportable)' if use_tpm else 'file (0600)'} EC P-256 key created")
        facts = line.wait("enrolled", lambda: read_json(state / "certs" / "chain.json"), 20,
                          lambda f: f"EST simpleenroll: {f['subject']} serial {f['serial'][:18]}... until "
                                    f"{time.strftime('%Y-%m-%d', time.gmtime(f['not_after']))}")
        line.wait("discovered", lambda: (state / "discovery.json").exists(), 20,
                  lambda _: f"Greengrass discovery: {len(lab.brokers)} cores, CA returned")
        line.wait("connected", lambda: (s := read_json(state / "status.json")) and s.get("session") == "online" and s,
                  20, lambda s: f"mTLS MQTT session to {s['endpoint']} as {facts['common_name']}")
        for n, what in ((1, "s/uat -> s/dat 71,<jwt>"),
                        (2, f"refreshed at half life ({TOKEN_LIFETIME / 2:.0f} s)"),
                        (3, f"refreshed at half life ({TOKEN_LIFETIME / 2:.0f} s)")):
            def refreshed(n: int = n) -> bool:
                return bool(((read_json(state / "status.json") or {}).get("token") or {}).get("refreshes", 0) >= n)

            def said(_: Any, what: str = what) -> str:
                return what

            line.wait(f"token #{n}", refreshed, TOKEN_LIFETIME * 2 + 10, said)
        ota_demo(lab, line, state)
    except (TetherError, OSError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        if agent is not None:
            print(f"--- agent log (last lines) ---\n{agent.tail(25)}", file=sys.stderr)
        return 1
    finally:
        if agent is not None:
            agent.stop()
        lab.stop()
        if tpm is not None:
            tpm.stop()
    ok = all(ok for _, ok in line.steps)
    print(f"\n{'PASS' if ok else 'FAIL'}: {len(line.steps)} steps in {time.monotonic() - line.start:.1f} s", flush=True)
    return 0 if ok else 1


def ota_demo(lab: Lab, line: Timeline, state: Path) -> None:
    """Publish a signed release and wait for the device to install and commit it."""
    release = publish_release(lab, "demo-app", "1.1.0", b"#!/bin/sh\necho 'demo app 1.1.0'\n" * 64)
    line.step("release", f"signed by the station's release key: {release['name']} {release['version']}")
    send_update(lab, "demo-device-1", release)
    line.wait("ota", lambda: (s := read_json(state / "ota" / "state.json")) and s.get("state") == "committed" and s,
              60, lambda s: f"515 -> downloaded, verified, installed to the other slot, restarted, committed "
                            f"{release['version']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.split("\n")[1])
    parser.add_argument("--tpm", action="store_true", help="keep the device key in a software TPM")
    parser.add_argument("--keep", help="work in this directory and keep it (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tether-demo-"))
    try:
        return run_demo(workdir, args.tpm)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
