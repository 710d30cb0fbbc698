"""A full disk under the state directory (a 2 MiB tmpfs, filled up): the agent says so, its key and
chain stay byte-identical, the outbox refuses new messages with a clear error instead of corrupting
its store, and everything it had accepted is delivered once space is back."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import load
from agent.publish_api import socket_path
from agent.publisher import Publisher, PublishError
from lab.mosquitto import Mosquitto
from lab.procs import wait_until
from tests.agent_bed import Agent, provisioned_device
from tests.faults.mqtt_bed import Subscriber, keeping_broker, numbered, restart
from tests.pki import Pki

DEVICE = "dev-df"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "statefs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"mounting a tmpfs needs root (CI runs as root): {done.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the file system refuses another byte."""
    filler = directory / f"filler-{len(list(directory.glob('filler-*')))}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_disk_is_reported_keeps_key_and_chain_and_refuses_publishes_cleanly(
        tmp_path: Path, pki: Pki, small_fs: Path, broker_factory: Callable[..., Mosquitto]) -> None:
    broker = keeping_broker(broker_factory, tmp_path)
    subscriber = Subscriber(pki, broker, f"{DEVICE}/telemetry")
    config = provisioned_device(tmp_path, pki, DEVICE, device={"state_dir": str(small_fs / "state")},
                                endpoints={"urls": [f"mqtts://localhost:{broker.port}"]}, token={"enabled": False},
                                mqtt={"backoff_base": 0.1, "backoff_cap": 0.5, "connect_timeout": 3.0})
    state = Path(load(config).state_dir)
    identity_files = [state / "keys" / "device.key.pem", state / "certs" / "chain.pem"]
    agent = Agent(config)
    try:
        agent.wait_status(session="online")
        with Publisher(socket_path(load(config))) as publisher:
            publisher.publish_many([("telemetry", p, 1) for p in numbered(10)])
        subscriber.wait_for(set(numbered(10)), 20, "messages before the disk fills")
        before = {f: f.read_bytes() for f in identity_files}

        fill(small_fs)
        accepted: list[bytes] = []
        with Publisher(socket_path(load(config))) as publisher, \
                pytest.raises(PublishError, match=r"disk full") as refused:
            for payload in numbered(200, tag="big"):
                publisher.publish("telemetry", payload + b"." * 32768)
                accepted.append(payload + b"." * 32768)
        assert "nothing of this batch was queued" in str(refused.value)

        restart(broker)  # the agent wants to record the lost session and the new one: no space for that
        wait_until(lambda: "disk full" in agent.log() and agent.log().count("session: connected") >= 2, 30,
                   "the agent to report the full disk and reconnect")

        agent.proc.kill()  # and a reboot on the full disk
        fill(small_fs / "state")  # whatever the killed agent's files freed
        start = len(agent.log())
        agent = Agent(config)
        wait_until(lambda: agent.proc.check_alive() or "session: connected" in agent.log()[start:], 30,
                   "the restarted agent to connect on the full disk")
        # reported right after the session is up (last good endpoint, status): wait for the line, do not race it
        wait_until(lambda: agent.proc.check_alive() or "disk full" in agent.log()[start:], 10, "the full disk reported")
        assert {f: f.read_bytes() for f in identity_files} == before, "key and chain are byte-identical"
        with sqlite3.connect(state / "outbox.sqlite") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

        for filler in [*small_fs.glob("filler-*"), *(small_fs / "state").glob("filler-*")]:
            filler.unlink()  # space is back: everything accepted goes out, nothing accepted is lost
        wait_until(lambda: agent.proc.check_alive() or os.path.exists(socket_path(load(config))), 20,
                   "the publish socket")
        subscriber.wait_for(set(accepted), 30, "messages accepted before the disk filled")
        with Publisher(socket_path(load(config))) as publisher:
            publisher.publish("telemetry", b"after")
        subscriber.wait_for({b"after"}, 20, "a message published once space is back")
        print(f"\nFIGURES disk-full: accepted_while_filling={len(accepted)}, refused with: {refused.value}; "
              "key and chain byte-identical; outbox integrity ok; lost=0")
    finally:
        agent.stop()
        subscriber.stop()
