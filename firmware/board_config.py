"""Reading tether.json and the DER credentials, with the one-line errors docs/firmware.md promises,
and making the TLS context from them.

A setup module (tether_main.SETUP_MODULES): tether_main calls ``load()`` once at start, then drops
it whole before the supervisor's code is imported, so none of this code shares a small heap with it.
"""

import json
import sys

from agent.core import defaults
from agent.core.endpoint_list import order_endpoints, parse_endpoint
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
# Accepted range of each numeric setting (all are seconds except max_packet, bytes), checked so that
# a value in tether.json cannot crash or stall the loop later: keepalive is a 16-bit field of
# CONNECT (MQTT 3.1.1 section 3.1.2.10), and a timeout of 1e400 (infinity to json) would wait
# forever. Those whose default is a float take any number; the others (keepalive, max_packet) integers.
RANGE = {"keepalive": (1, 65535), "heartbeat_interval": (1, 86400), "token_timeout": (1, 3600),
         "backoff_base": (1, 3600), "backoff_cap": (1, 86400), "connect_timeout": (1, 300),
         "max_packet": (256, 65536)}
# Longest accepted text setting; every character must be printable ASCII (no NUL, no control
# character that would end up in a client id, topic or path). device_id has its own rule.
TEXT_LIMIT = {"topic_prefix": 128, "client_id_prefix": 32, "cred_dir": 128}
MAX_ENDPOINTS = 8
MAX_URL_CHARS = 255
# tether.json is read whole: a larger file is refused before it is parsed, not out of memory.
MAX_CONFIG_BYTES = 4096

# THE device-id rule of provisioning/identity.py check_device_id, in MicroPython: the id is the
# certificate CN, the MQTT client id, a topic level and a directory name. Both are tested against
# one table (tests/firmware/vectors/device_ids.json).
MAX_DEVICE_ID = 64
DEVICE_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
RESERVED_IDS = ("tether-token-service", "tether-ota-service")


def _shown(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def device_id_problem(device_id):
    """Why ``device_id`` cannot be a device id (the reason text), or None if it can."""
    if not isinstance(device_id, str) or not device_id:
        return "must be a non-empty string, got %s" % _shown(device_id)
    if len(device_id) > MAX_DEVICE_ID:
        return "%d characters, at most %d allowed" % (len(device_id), MAX_DEVICE_ID)
    if ":" in device_id:
        return "contains ':', which Cumulocity forbids in a certificate CN (the MQTT client id separator)"
    for ch in device_id:
        if ch not in DEVICE_ID_CHARS:
            return "contains %s; use letters, digits, '.', '_' and '-'" % _shown(ch)
    if device_id in (".", ".."):
        return "%s is not a valid SPIFFE ID path segment (nor a safe directory name)" % _shown(device_id)
    if device_id in RESERVED_IDS:
        return "%s is reserved for a service identity" % _shown(device_id)
    return None


def _text_problem(value, limit):
    if len(value) > limit:
        return "%d characters, at most %d allowed" % (len(value), limit)
    for ch in value:
        if not " " < ch < "\x7f":
            return "contains %s; printable ASCII only" % _shown(ch)
    return None


def _check(path, key, value):
    """ParameterError naming ``path`` and ``key`` unless ``value`` is within the key's bounds."""
    problem = None
    if key in RANGE:
        low, high = RANGE[key]
        if not low <= value <= high:  # also false for NaN
            problem = "must be within %r..%r, got %s" % (low, high, _shown(value))
    elif key == "device_id":
        problem = device_id_problem(value)
    elif key in TEXT_LIMIT:
        problem = _text_problem(value, TEXT_LIMIT[key])
    elif key == "endpoints":
        if len(value) > MAX_ENDPOINTS:
            problem = "%d URLs, at most %d allowed" % (len(value), MAX_ENDPOINTS)
        for i, url in enumerate(value):
            if not isinstance(url, str):
                raise ParameterError("%s: endpoints[%d]" % (path, i), "expected str, got %s" % _shown(url))
            reason = _text_problem(url, MAX_URL_CHARS)
            if reason:
                raise ParameterError("%s: endpoints[%d]" % (path, i), reason)
    if problem:
        raise ParameterError(path + ": " + key, problem)


class CredentialError(CoreError):
    """A credential file that is missing, not DER, or not what the TLS stack can use."""


def load(path=CONFIG_FILE):
    """``(config, TLS context)`` from ``path`` and the DER files in its ``cred_dir``; raises
    CoreError (a bad file or setting) or OSError (no usable TLS) with a one-line message."""
    config = load_config(path)
    creds = load_credentials(config["cred_dir"])
    # Imported here, not at the top: net needs sockets, which the checks above do not (they run
    # in tests on ports without them).
    import net

    return config, make_tls_context(net, creds, config["cred_dir"])


def endpoints(config, path=CONFIG_FILE):
    """``config["endpoints"]`` (URLs) as Endpoints in try order; EndpointError naming
    ``tether.json: endpoints[i]`` for a bad URL. Read here, with the setup modules, so that
    agent/core/endpoint_list.py is dropped with them before the session's modules are imported:
    on a ROMFS board that import is the heap's peak."""
    return order_endpoints([parse_endpoint(u, field="%s: endpoints[%d]" % (path, i))
                            for i, u in enumerate(config["endpoints"])])


def load_config(path=CONFIG_FILE, opener=open):
    """DEFAULTS overridden by the JSON object in ``path``.

    Raises ParameterError naming the file and key for a missing file, bad JSON, unknown keys,
    wrong types or out-of-range values.
    """
    try:
        with opener(path) as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError:
        raise ParameterError(path, "missing; write it with at least device_id and endpoints "
                                "(docs/firmware.md)") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ParameterError(path, "larger than %d bytes" % MAX_CONFIG_BYTES)
    try:
        local = json.loads(text)
    except ValueError:
        raise ParameterError(path, "not valid JSON") from None
    if not isinstance(local, dict):
        raise ParameterError(path, "expected a JSON object")
    config = dict(DEFAULTS)
    for key, value in local.items():
        if key not in DEFAULTS:
            shown = _shown(key) if _text_problem(key, 40) else key
            raise ParameterError(path + ": " + shown, "unknown key (known: %s)" % ", ".join(sorted(DEFAULTS)))
        default = DEFAULTS[key]
        expected = str if default is None else type(default)
        if type(value) is not expected and not (expected is float and type(value) is int):
            raise ParameterError(path + ": " + key, "expected %s, got %s" % (
                "number" if expected is float else expected.__name__, _shown(value)))
        _check(path, key, value)
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


def tls_context(net, cert_der, key_der, ca_der):
    """A MicroPython SSLContext presenting the device certificate and key (DER) and trusting
    ``ca_der`` only; ValueError from mbedTLS when a credential does not parse, OSError when this
    port has no TLS or cannot verify (net.QUIRKS)."""
    ssl = net.ssl
    if ssl is None:
        raise OSError("this MicroPython build has no ssl module; a TLS-capable firmware is required")
    if not net.quirks()["verify"]:
        raise OSError("%s cannot verify broker certificates; refusing unverified TLS" % sys.platform)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(cert_der, key_der)
    ctx.load_verify_locations(ca_der)  # MicroPython's tls takes cadata, positional only
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def make_tls_context(net, creds, cred_dir):
    """The TLS context for ``creds`` over ``net`` (firmware/net.py: its ssl module and quirks);
    CredentialError naming the file the TLS stack refused."""
    base = cred_dir.rstrip("/") + "/"
    try:
        return tls_context(net, creds["device.crt.der"], creds["device.key.der"], creds["ca.crt.der"])
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
        net.ssl.SSLContext(net.ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(creds["device.crt.der"])
    except ValueError:
        return "device.crt.der"
    return "ca.crt.der"
