"""`tether-lab`: run the local core (up / down / serve), make lab devices, check a device, send OTA.

    tether-lab up --dir DIR [--brokers N] [--broker mosquitto|rabbitmq] [--token-lifetime S]
                                                                  start in the background
    tether-lab down --dir DIR                                     stop everything `up` started
    tether-lab device --dir DIR ID [--tpm-tcti T]                 config + one-time password for a device
    tether-lab check DEVICE_CONFIG                                end-of-line check of a provisioned unit
    tether-lab ota --dir DIR RELEASE_DIR [--device ID]            publish a release and send the 515 operation
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from agent.config import load
from hal import TetherError
from hal.about import VersionAction
from lab.core import BROKER_KINDS, Lab, LabSettings, wait_ready
from lab.eol import end_of_line_check
from lab.ota import host_release, send_update
from lab.procs import LabError, wait_until
from provisioning.identity import check_device_id


def lab_dir(value: str | None) -> Path:
    value = value or os.environ.get("TETHER_LAB_DIR")
    if not value:
        raise LabError("no lab directory: pass --dir DIR or set TETHER_LAB_DIR")
    return Path(value).resolve()


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the lab in the foreground until SIGTERM, restarting brokers or the station if they die."""
    lab = Lab(lab_dir(args.dir), LabSettings(brokers=args.brokers, broker=args.broker,
                                             token_lifetime=args.token_lifetime))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    lab.start()
    print(f"lab up in {lab.dir}: station {lab.station_url}, {args.broker} "
          f"{', '.join(lab.broker_urls)}, discovery {lab.discovery.url}", flush=True)
    try:
        while not stop.wait(1.0):
            for i, broker in enumerate(lab.brokers):
                if broker.proc and not broker.proc.alive():
                    print(f"lab: {broker.name} exited; restarting it on port {broker.port}", flush=True)
                    lab.restart_broker(i)
            for node in lab.cluster.nodes if lab.cluster is not None else ():
                if node.proc and not node.alive():
                    print(f"lab: RabbitMQ node {node.name} exited; starting it again", flush=True)
                    lab.cluster.start_node(node.index)
            if lab.station and not lab.station.alive():
                print("lab: the station exited; restarting it", flush=True)
                lab._start_station()
    finally:
        lab.stop()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    directory = lab_dir(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    state = directory / "lab.json"
    if state.exists():
        pid = json.loads(state.read_text()).get("pid")
        if pid and _alive(pid):
            raise LabError(f"a lab already runs in {directory} (pid {pid}); `tether-lab down --dir {directory}`")
        state.unlink()
    log = open(directory / "lab.log", "ab")  # noqa: SIM115 (handed to the detached child)
    subprocess.Popen([sys.executable, "-m", "lab.cli", "serve", "--dir", str(directory), "--brokers",
                      str(args.brokers), "--broker", args.broker, "--token-lifetime", str(args.token_lifetime)],
                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    info = wait_ready(directory, 60 if args.broker == "mosquitto" else 600)  # RabbitMQ nodes boot one by one
    print(json.dumps(info, indent=2))
    print(f"device config: tether-lab device --dir {directory} ID  (then: tether --config "
          f"{directory}/devices/ID/tether.toml run)", file=sys.stderr)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cmd_down(args: argparse.Namespace) -> int:
    directory = lab_dir(args.dir)
    state = directory / "lab.json"
    if not state.exists():
        print(f"no lab runs in {directory}")
        return 0
    pid = int(json.loads(state.read_text())["pid"])
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _alive(pid), 20, f"the lab (pid {pid}) to stop")
    print(f"lab in {directory} stopped")
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    check_device_id(args.device_id, "DEVICE_ID")  # before the lab (or anything on disk) is touched
    path = Lab.attach(lab_dir(args.dir)).device(args.device_id, tpm_tcti=args.tpm_tcti)
    print(path)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    return end_of_line_check(load(args.config))


def cmd_ota(args: argparse.Namespace) -> int:
    lab = Lab.attach(lab_dir(args.dir))
    release = host_release(lab, Path(args.release_dir))
    print(send_update(lab, args.device, release))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether-lab", description="Tether's local core for development, "
                                     "demos, end-to-end tests and end-of-line checks.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("up", "start the lab in the background"), ("serve", "run the lab in the foreground")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", help="lab directory (default: $TETHER_LAB_DIR)")
        p.add_argument("--brokers", type=int, default=2, help="mosquitto brokers, or RabbitMQ cluster nodes")
        p.add_argument("--broker", choices=BROKER_KINDS, default="mosquitto",
                       help="mosquitto brokers, or one RabbitMQ cluster (Debian's rabbitmq-server)")
        p.add_argument("--token-lifetime", type=float, default=3600.0, help="JWT lifetime in seconds")
    p = sub.add_parser("down", help="stop the lab")
    p.add_argument("--dir")
    p = sub.add_parser("device", help="write a device config and one-time password")
    p.add_argument("--dir")
    p.add_argument("device_id")
    p.add_argument("--tpm-tcti", help="use a TPM key through this TCTI")
    p = sub.add_parser("check", help="end-of-line check of a provisioned device")
    p.add_argument("config")
    p = sub.add_parser("ota", help="host a signed release and send the 515 firmware operation to a device")
    p.add_argument("--dir")
    p.add_argument("release_dir", help="output of `tether-station release sign --out DIR`")
    p.add_argument("--device", default="lab-device-1", help="device id (default: lab-device-1)")
    return parser


HANDLERS = {"serve": cmd_serve, "up": cmd_up, "down": cmd_down, "device": cmd_device, "check": cmd_check,
            "ota": cmd_ota}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except TetherError as exc:
        print(f"tether-lab: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
