"""OTA in the lab: sign a release with the station's release key, host it on the artifact server, and
send the Cumulocity firmware operation `515,<serial>,<name>,<version>,<url>` to a device.

The operation is published by the lab's OTA service identity (`tether-ota-service`, allowed by the
broker ACL to address any device) on `<device>/s/ds` of every core, since the device may be on any.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from agent.core.smartrest import format_line
from agent.core.topics import Topics
from agent.tls import client_context
from hal.keys import TlsKey
from lab.core import Lab, station_cli
from lab.procs import LabError

OTA_SERVICE = "tether-ota-service"


def publish_release(lab: Lab, name: str, version: str, payload: bytes | Path,
                    min_version: str | None = None, fmt: str | None = None) -> dict[str, Any]:
    """Sign `payload` with the station's release key (created on first use) into the artifact root.

    `payload` is the bytes to sign, or with `fmt` (swu, raucb, tar) the directory the station builds that
    bundle from (`release sign --format`). The artifact server serves every kind the same way.
    """
    if not (lab.station_dir / "release" / "release.key").exists():
        station_cli("release", "keygen", *lab.station_args())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "payload"
        if isinstance(payload, Path):
            src = payload
        else:
            src.write_bytes(payload)
        extra = ["--min-version", min_version] if min_version else []
        extra += ["--format", fmt] if fmt else []
        station_cli("release", "sign", *lab.station_args(), "--name", name, "--version", version, "--out",
                    str(lab.dir / "artifacts" / name / version), *extra, str(src))
    return host_release(lab, lab.dir / "artifacts" / name / version)


def host_release(lab: Lab, release_dir: Path) -> dict[str, Any]:
    """Make a signed release directory available on the artifact server; return name, version, url."""
    try:
        manifest = json.loads((release_dir / "manifest.json").read_text())
        name, version = str(manifest["name"]), str(manifest["version"])
    except (OSError, ValueError, KeyError) as exc:
        raise LabError(f"{release_dir}: not a release directory (manifest.json: {exc})") from None
    target = lab.dir / "artifacts" / name / version
    if target.resolve() != release_dir.resolve():
        shutil.copytree(release_dir, target, dirs_exist_ok=True)
    base = lab._attached.get("artifacts") or lab.artifacts.url()
    return {"name": name, "version": version, "url": f"{base.rstrip('/')}/{name}/{version}/"}


def send_update(lab: Lab, device_id: str, release: dict[str, Any], timeout: float = 10.0) -> str:
    """Publish the 515 operation for `release` to `device_id` on every core (on the first node that
    takes it, for a cluster); return the line sent."""
    import paho.mqtt.client as mqtt

    certfile, keyfile = lab._service_cert(OTA_SERVICE)
    line = format_line("515", device_id, release["name"], release["version"], release["url"])
    for url in lab.broker_urls:
        host, port = url.removeprefix("mqtts://").rsplit(":", 1)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{OTA_SERVICE}-{port}")
        client.tls_set_context(client_context(certfile, TlsKey(str(keyfile)), cafile=str(lab.ca_file)))
        sent = threading.Event()
        client.on_publish = lambda *a, sent=sent: sent.set()
        try:
            client.connect(host, int(port), keepalive=30)
        except OSError:
            continue  # a core that is down cannot carry the operation; the others can
        client.loop_start()
        try:
            client.publish(Topics(device_id).downstream, line, qos=1)  # the lab's devices: topics under their id
            if not sent.wait(timeout):
                raise LabError(f"{url}: the broker did not acknowledge the operation within {timeout:.0f} s")
        finally:
            client.disconnect()
            client.loop_stop()
        if lab.clustered:
            return line  # one node of a cluster reaches the device wherever it is connected
    return line
