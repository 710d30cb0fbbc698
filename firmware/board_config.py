"""Reading tether.json and the DER credentials, with the one-line errors docs/firmware.md promises.

Runs once at start: tether_main imports it, builds the TLS context and unloads it again
(``del sys.modules``), so none of this code stays in a small heap while the session runs.
"""

import json

from agent.core import defaults
from agent.core.errors import CoreError, ParameterError

CONFIG_FILE = "tether.json"
CREDENTIAL_FILES = ("device.crt.der", "device.key.der", "ca.crt.der")

# The settings a board shares with `tether run` take the agent's defaults (agent/core/defaults.py).
DEFAULTS = {
    "device_id": None,
    "endpoints": [],
    "topic_prefix": defaults.TOPIC_PREFIX,  # "{id}" is replaced by device_id
    "client_id_prefix": defaults.CLIENT_ID_PREFIX,
    "cred_dir": ".",
    "keepalive": defaults.KEEPALIVE,
    "heartbeat_interval": defaults.HEARTBEAT_INTERVAL,
    "token_timeout": defaults.TOKEN_TIMEOUT,
    "backoff_base": defaults.BACKOFF_BASE,
    "backoff_cap": defaults.BACKOFF_CAP,
    "connect_timeout": defaults.CONNECT_TIMEOUT,
    "max_packet": 8192,
    "heap_report": False,
}
# Smallest accepted value of each numeric setting (all are seconds except max_packet, bytes).
# Those whose default is a float take any number; the others (keepalive, max_packet) integers.
MINIMUM = {"keepalive": 1, "heartbeat_interval": 1, "token_timeout": 1, "backoff_base": 1,
           "backoff_cap": 1, "connect_timeout": 1, "max_packet": 256}


class CredentialError(CoreError):
    """A credential file that is missing, not DER, or not what the TLS stack can use."""


def load_config(path=CONFIG_FILE, opener=open):
    """DEFAULTS overridden by the JSON object in ``path``.

    Raises ParameterError naming the file and key for a missing file, bad JSON, unknown keys,
    wrong types or out-of-range values.
    """
    try:
        with opener(path) as f:
            text = f.read()
    except OSError:
        raise ParameterError(path, "missing; write it with at least device_id and endpoints "
                                "(docs/firmware.md)") from None
    try:
        local = json.loads(text)
    except ValueError:
        raise ParameterError(path, "not valid JSON") from None
    if not isinstance(local, dict):
        raise ParameterError(path, "expected a JSON object")
    config = dict(DEFAULTS)
    for key, value in local.items():
        if key not in DEFAULTS:
            raise ParameterError(path + ": " + key, "unknown key (known: %s)" % ", ".join(sorted(DEFAULTS)))
        default = DEFAULTS[key]
        expected = str if default is None else type(default)
        if type(value) is not expected and not (expected is float and type(value) is int):
            raise ParameterError(path + ": " + key, "expected %s, got %r" % (
                "number" if expected is float else expected.__name__, value))
        if key in MINIMUM and value < MINIMUM[key]:
            raise ParameterError(path + ": " + key, "must be >= %r, got %r" % (MINIMUM[key], value))
        config[key] = value
    if not config["device_id"]:
        raise ParameterError(path + ": device_id", "required (the certificate CN)")
    if not config["endpoints"]:
        raise ParameterError(path + ": endpoints", "at least one mqtts://host:port is required")
    if config["backoff_cap"] < config["backoff_base"]:
        raise ParameterError(path + ": backoff_cap", "must be >= backoff_base (%r), got %r"
                          % (config["backoff_base"], config["backoff_cap"]))
    return config


def _tlv(data, at, name):
    """(tag, start, end) of the DER element at ``at``; CredentialError if it overruns ``data``."""
    if at + 2 > len(data):
        raise CredentialError(name, "corrupt DER: element at byte %d is cut off" % at)
    tag, n = data[at], data[at + 1]
    at += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or at + k > len(data):
            raise CredentialError(name, "corrupt DER length at byte %d" % (at - 1))
        n = int.from_bytes(data[at:at + k], "big")
        at += k
    if at + n > len(data):
        raise CredentialError(name, "corrupt or truncated: DER says %d bytes, file has %d" % (at + n, len(data)))
    return tag, at, at + n


def check_der(data, name):
    """Return ``data`` if it is one DER SEQUENCE filling the file, else CredentialError."""
    if len(data) < 2 or data[0] != 0x30:
        raise CredentialError(name, "not DER (expected a SEQUENCE); PEM files must be converted")
    end = _tlv(data, 0, name)[2]
    if end != len(data):
        raise CredentialError(name, "corrupt: %d bytes after the DER SEQUENCE" % (len(data) - end))
    return data


def ec_public_point(key_der, name):
    """The public point stored in a SEC1 EC private key (RFC 5915 ``publicKey [1]``), or None
    for other key formats (PKCS#8, RSA), which are left for the TLS stack to judge."""
    _, at, end = _tlv(key_der, 0, name)
    while at < end:
        tag, start, stop = _tlv(key_der, at, name)
        if tag == 0xA1:
            inner, bits, bits_end = _tlv(key_der, start, name)
            if inner == 0x03 and bits_end - bits > 1:
                return bytes(key_der[bits + 1:bits_end])  # skip the unused-bits byte
        at = stop
    return None


def load_credentials(cred_dir, opener=open):
    """Read and check the three DER files; returns ``{file name: bytes}``.

    CredentialError names the file: missing, not DER, truncated, or a key that is not the
    certificate's (a SEC1 key whose public point does not appear in the certificate).
    """
    creds = {}
    for name in CREDENTIAL_FILES:
        path = cred_dir.rstrip("/") + "/" + name
        try:
            with opener(path, "rb") as f:
                data = f.read()
        except OSError:
            raise CredentialError(path, "missing; copy it from `tether-station issue --format der`") from None
        creds[name] = check_der(data, path)
    key_path = cred_dir.rstrip("/") + "/device.key.der"
    point = ec_public_point(creds["device.key.der"], key_path)
    if point is not None and point not in creds["device.crt.der"]:
        raise CredentialError(key_path, "not the key of device.crt.der (its public key is not in the "
                                        "certificate); copy both from the same `tether-station issue`")
    return creds


def make_tls_context(net, creds, cred_dir):
    """The TLS context for ``creds``; CredentialError naming the file the TLS stack refused."""
    base = cred_dir.rstrip("/") + "/"
    try:
        return net.tls_context(creds["device.crt.der"], creds["device.key.der"], creds["ca.crt.der"])
    except ValueError as exc:
        # MicroPython's ssl says "invalid key" or "invalid cert"; load_verify_locations runs
        # after load_cert_chain, so an invalid cert once the key passed is the CA file.
        text = str(exc)
        name = "device.key.der" if "key" in text else _which_cert(net, creds)
        raise CredentialError(base + name, "the TLS stack cannot load it (%s); re-issue with "
                                           "`tether-station issue --format der`" % text) from None


def _which_cert(net, creds):
    # Load the device certificate alone as a trust anchor in a throwaway context to tell a bad
    # device certificate from a bad CA file (both say "invalid cert").
    try:
        net.ssl.SSLContext(net.ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=creds["device.crt.der"])
    except ValueError:
        return "device.crt.der"
    return "ca.crt.der"
