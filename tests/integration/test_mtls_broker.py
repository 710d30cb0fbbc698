"""A chain stored by CertStore plus each key backend completes an mTLS handshake with a real
mosquitto (`require_certificate true`) and a QoS 1 publish."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.config import load
from agent.identity import DeviceIdentity
from lab.mosquitto import Mosquitto
from lab.swtpm import SoftTpm
from tests.conftest import REPO, run_tether, write_config
from tests.pki import Pki


def provision(tmp_path: Path, pki: Pki, device_id: str, **keys: str) -> tuple[Path, DeviceIdentity]:
    config = write_config(tmp_path / device_id, device_id, keys=keys)
    assert run_tether("keygen", config=config).returncode == 0
    identity = DeviceIdentity(load(config))
    identity.install_chain(pki.device_chain(identity.keystore.public_key("device"), device_id))
    return config, identity


def publish(config: Path, broker: Mosquitto, pki: Pki, topic: str, env: dict[str, str] | None = None) -> \
        subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.tools.mtls_publish", str(config), "localhost",
                           str(broker.port), str(pki.root_file), topic], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, **(env or {})}, check=False)


def test_file_key_device_publishes_over_mtls(tmp_path: Path, pki: Pki, broker: Mosquitto) -> None:
    config, _ = provision(tmp_path, pki, "dev-file")
    done = publish(config, broker, pki, "dev-file/telemetry")
    assert done.returncode == 0, done.stderr + broker.log()
    assert "PUBACK" in done.stdout


def test_tpm_key_device_publishes_over_mtls(tmp_path: Path, pki: Pki, broker: Mosquitto, softtpm: SoftTpm) -> None:
    config, identity = provision(tmp_path, pki, "dev-tpm", backend="tpm", tcti=softtpm.tcti)
    env = identity.keystore.tls_env()
    assert env["OPENSSL_CONF"].endswith("openssl-tpm2.cnf")
    done = publish(config, broker, pki, "dev-tpm/telemetry", env)
    assert done.returncode == 0, done.stderr + broker.log()
    assert "PUBACK" in done.stdout


def test_device_without_certificate_is_refused_by_the_broker(tmp_path: Path, pki: Pki, broker: Mosquitto) -> None:
    import socket
    import ssl

    from agent.tls import client_context

    ctx = client_context(None, None, cafile=str(pki.root_file))
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        try:
            # TLS 1.3 checks the client certificate after the handshake: the refusal arrives as an
            # alert (or a closed connection) on the first read.
            tls.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 0]))
            data = tls.recv(4)
        except (ssl.SSLError, ConnectionResetError) as exc:
            data = str(exc).encode()
    assert not data.startswith(b"\x20"), "mosquitto sent a CONNACK to a client without a certificate"


def test_tpm_key_under_a_persistent_parent_publishes_over_mtls(tmp_path: Path, pki: Pki, broker: Mosquitto,
                                                              softtpm: SoftTpm) -> None:
    config, identity = provision(tmp_path, pki, "dev-srk", backend="tpm", tcti=softtpm.tcti,
                                 parent_handle="0x81000001")
    persistent = subprocess.run(["tpm2_getcap", "handles-persistent"], capture_output=True, text=True, check=True,
                                env={**os.environ, **softtpm.env})
    assert "0x81000001" in persistent.stdout
    assert identity.keystore.describe()["parent_handle"] == "0x81000001"
    done = publish(config, broker, pki, "dev-srk/telemetry", identity.keystore.tls_env())
    assert done.returncode == 0, done.stderr + broker.log()
    # a second key reuses the same persistent parent instead of creating another
    identity.keystore.create("device.next")
    again = subprocess.run(["tpm2_getcap", "handles-persistent"], capture_output=True, text=True, check=True,
                           env={**os.environ, **softtpm.env})
    assert again.stdout.count("0x81") == 1
