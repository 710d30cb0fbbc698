"""Connect to a broker over mutual TLS with a device's stored chain and key, publish once at QoS 1.

Run as a child process so a TPM key can be used: OPENSSL_CONF must be set before `ssl` is imported.
Prints "PUBACK" and exits 0 when the broker acknowledged the message.
Usage: python -m tests.tools.mtls_publish CONFIG HOST PORT CAFILE TOPIC
"""

from __future__ import annotations

import sys
import threading

import paho.mqtt.client as mqtt

from agent.config import load
from agent.identity import DeviceIdentity
from agent.tls import client_context


def main(config_path: str, host: str, port: str, cafile: str, topic: str) -> int:
    config = load(config_path)
    identity = DeviceIdentity(config)
    ctx = client_context(identity.certstore.path(), identity.keystore.tls_key("device"), cafile=cafile)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id)
    client.tls_set_context(ctx)
    acked = threading.Event()
    client.on_publish = lambda *a: acked.set()
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, b"hello", qos=1)
        if acked.wait(10) and info.is_published():
            print("PUBACK")
            return 0
        print("no PUBACK within 10 s", file=sys.stderr)
        return 1
    finally:
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
