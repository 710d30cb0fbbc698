"""Board entry point: load config and credentials from flash, then run the session forever.

Files on flash (the working directory, normally ``/``):
- ``tether.json``: overrides for DEFAULTS below; at least ``device_id`` and ``endpoints``.
- ``device.crt.der``, ``device.key.der``, ``ca.crt.der`` in ``cred_dir``: the device certificate,
  its private key and the CA that signs the brokers, DER-encoded, as the provisioning station
  writes them with ``tether-station issue --format der``.
A missing or corrupt file prints one clear line saying which file and what to do, and main()
returns to the REPL instead of rebooting into the same failure.
"""

import gc
import json
import random
import time

from agent.core.backoff import Backoff
from agent.core.endpoints import Rotation, order_endpoints, parse_endpoint
from agent.core.errors import ConfigError, CoreError
from agent.core.token_schedule import TokenRefresher
from agent.core.topics import Topics, client_id

CONFIG_FILE = "tether.json"
CREDENTIAL_FILES = ("device.crt.der", "device.key.der", "ca.crt.der")

DEFAULTS = {
    "device_id": None,
    "endpoints": [],
    "topic_prefix": "",
    "client_id_prefix": "d:",
    "cred_dir": ".",
    "keepalive": 60,
    "heartbeat_interval": 60,
    "token_timeout": 30,
    "backoff_base": 1,
    "backoff_cap": 300,
    "connect_timeout": 10,
    "max_packet": 8192,
}


class CredentialError(CoreError):
    """A credential file that is missing or not DER."""


def load_config(path=CONFIG_FILE, opener=open):
    """DEFAULTS overridden by the JSON object in ``path`` (absent file: DEFAULTS alone).

    Raises ConfigError naming the file and key for bad JSON, unknown keys or wrong types.
    """
    config = dict(DEFAULTS)
    try:
        with opener(path) as f:
            text = f.read()
    except OSError:
        return config
    try:
        local = json.loads(text)
    except ValueError:
        raise ConfigError(path, "not valid JSON") from None
    if not isinstance(local, dict):
        raise ConfigError(path, "expected a JSON object")
    for key, value in local.items():
        if key not in DEFAULTS:
            raise ConfigError(path + ": " + key, "unknown key (known: %s)" % ", ".join(sorted(DEFAULTS)))
        default = DEFAULTS[key]
        if default is not None and type(value) is not type(default):
            raise ConfigError(path + ": " + key, "expected %s, got %r" % (type(default).__name__, value))
        config[key] = value
    if not config["device_id"]:
        raise ConfigError(path + ": device_id", "required (the certificate CN)")
    if not config["endpoints"]:
        raise ConfigError(path + ": endpoints", "at least one mqtts://host:port is required")
    return config


def check_der(data, name):
    """Return ``data`` if it looks like one DER SEQUENCE filling the file, else CredentialError."""
    if len(data) < 2 or data[0] != 0x30:
        raise CredentialError(name, "not DER (expected a SEQUENCE); PEM files must be converted")
    n = data[1]
    if n < 0x80:
        length, head = n, 2
    else:
        k = n & 0x7F
        if k == 0 or k > 4 or len(data) < 2 + k:
            raise CredentialError(name, "corrupt DER length")
        length = int.from_bytes(data[2:2 + k], "big")
        head = 2 + k
    if head + length != len(data):
        raise CredentialError(name, "corrupt or truncated: DER says %d bytes, file has %d"
                              % (head + length, len(data)))
    return data


def load_credentials(cred_dir, opener=open):
    """Read and check the three DER files; returns ``{file name: bytes}``."""
    creds = {}
    for name in CREDENTIAL_FILES:
        path = cred_dir.rstrip("/") + "/" + name
        try:
            with opener(path, "rb") as f:
                data = f.read()
        except OSError:
            raise CredentialError(path, "missing; copy it from `tether-station issue --format der`") from None
        creds[name] = check_der(data, path)
    return creds


def _rand():
    # random.random() is an optional extra on some ports; getrandbits is always there.
    return random.getrandbits(24) / 16777216


def build_session(config, connect, clock, wait, rand, on_event):
    """A Session for ``config`` with the given I/O; raises CoreError for bad endpoint URLs."""
    from session import Session

    eps = [parse_endpoint(u, field="%s: endpoints[%d]" % (CONFIG_FILE, i))
           for i, u in enumerate(config["endpoints"])]
    backoff = Backoff(config["backoff_base"], config["backoff_cap"])
    return Session(
        client_id(config["device_id"], config["client_id_prefix"]),
        Topics(config["topic_prefix"]),
        Rotation(order_endpoints(eps)),
        backoff,
        TokenRefresher(Backoff(config["backoff_base"], config["backoff_cap"]), config["token_timeout"]),
        connect, clock, wait, rand, on_event,
        keepalive=config["keepalive"],
        heartbeat_interval=config["heartbeat_interval"],
        connect_timeout=config["connect_timeout"],
        max_packet=config["max_packet"],
    )


def log_event(name, detail):
    """Print session events on the console, the only log a bare board has."""
    if name not in ("published", "message"):
        print("tether:", name, detail if detail is not None else "")


def main():
    """Load everything, then step the session forever; returns only on a setup error."""
    try:
        config = load_config()
        creds = load_credentials(config["cred_dir"])
        import net

        ctx = net.tls_context(creds["device.crt.der"], creds["device.key.der"], creds["ca.crt.der"])
        del creds
        session = build_session(config, net.connector(ctx, config["connect_timeout"]),
                                time.time, time.sleep, _rand, log_event)
    except (CoreError, OSError) as exc:
        print("tether: cannot start:", exc)
        return
    gc.collect()
    while True:
        session.step()
        # TLS records and packet buffers fragment a small heap; collect before the next read.
        gc.collect()


if __name__ == "__main__":
    main()
