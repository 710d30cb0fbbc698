"""Device identifiers and the names derived from them (CN, SPIFFE ID, MQTT client id).

`check_device_id` is THE device-id rule: the station applies it when it issues an OTP and when it
enrolls, the agent when it loads its configuration, the lab before it makes a device directory. It
lives here (not in agent/core) because the station must not import `agent`, and the firmware gets
its id from credentials the station already checked.
"""

from __future__ import annotations

from collections.abc import Collection

from provisioning import ProvisioningError

MAX_DEVICE_ID = 64
_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# The station's default reserved ids (station.toml reserved_ids, where an operator adds observers): the
# lab's brokers let exactly the configured ones read and write every device's topics (lab/core.py
# Lab.services), so a device must never get a certificate with one of these CNs.
RESERVED_IDS = ("tether-token-service", "tether-ota-service")
# What a supported broker cannot carry in a device id, which is the first topic level of every device
# topic (docs/device.md "Brokers"): characters, and why. mosquitto and amqtt carry every id below.
BROKER_LIMITS: dict[str, tuple[str, str]] = {
    "rabbitmq": (".", "RabbitMQ's MQTT plugin (3.10) reads as a topic level separator: 'a.b/s/us' reaches "
                      "subscribers as 'a/b/s/us', among device 'a's topics"),
}
BROKERS = ("mosquitto", "rabbitmq", "amqtt")


def check_device_id(device_id: object, where: str = "device id", reserved: Collection[str] = RESERVED_IDS,
                    carried_by: Collection[str] = BROKERS) -> str:
    """Return `device_id` if it can be a CN, an MQTT client id, a topic level on every broker in
    `carried_by`, a SPIFFE path segment and a directory name; else raise ProvisioningError naming
    `where` and the rule.

    Cumulocity forbids ':' in the CN (it is the client id separator); '/', '+' and '#' would break
    the per-device topic prefix the broker's ACL relies on; SPIFFE forbids the path segments '.' and
    '..' (which are also directory traversal); `reserved` names belong to services; BROKER_LIMITS
    says what a broker cannot carry. Whoever gives out ids (station, lab) checks against every
    supported broker; a device checking the id it already holds passes `carried_by=()`, so a device
    enrolled before a limit was known keeps working on the brokers that carry it.
    """
    if not isinstance(device_id, str) or not device_id:
        raise ProvisioningError(f"{where}: must be a non-empty string, got {device_id!r}")
    if len(device_id) > MAX_DEVICE_ID:
        raise ProvisioningError(f"{where}: {len(device_id)} characters, at most {MAX_DEVICE_ID} allowed")
    if ":" in device_id:
        raise ProvisioningError(f"{where}: {device_id!r} contains ':', which Cumulocity forbids in a "
                                "certificate CN (it is the MQTT client id separator)")
    bad = sorted(set(device_id) - _ALLOWED)
    if bad:
        raise ProvisioningError(f"{where}: {device_id!r} contains {''.join(bad)!r}; use letters, digits, "
                                "'.', '_' and '-'")
    if device_id in (".", ".."):
        raise ProvisioningError(f"{where}: {device_id!r} is not a valid SPIFFE ID path segment (nor a safe "
                                "directory name)")
    for broker, (chars, why) in BROKER_LIMITS.items():
        found = sorted(set(device_id) & set(chars)) if broker in carried_by else []
        if found:
            raise ProvisioningError(f"{where}: {device_id!r} contains {''.join(found)!r}, which {why}; use "
                                    "letters, digits, '_' and '-'")
    if device_id in reserved:
        raise ProvisioningError(f"{where}: {device_id!r} is reserved for a service identity (station.toml "
                                "reserved_ids); choose another device id")
    return device_id


def check_trust_domain(name: object, where: str = "trust domain") -> str:
    if not isinstance(name, str) or not name or any(c in name for c in "/:@ ") or name != name.lower():
        raise ProvisioningError(f"{where}: {name!r} is not a SPIFFE trust domain (lowercase host-like "
                                "name such as 'factory.example')")
    return name


def spiffe_id(trust_domain: str, device_id: str) -> str:
    """`spiffe://<trust-domain>/device/<device-id>`: the first SAN URI of a device certificate."""
    return f"spiffe://{trust_domain}/device/{device_id}"


def parse_spiffe_id(uri: str) -> tuple[str, str] | None:
    """(trust domain, device id) of a device SPIFFE ID, or None if `uri` is not one."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        return None
    domain, _, path = uri[len(prefix):].partition("/")
    kind, _, device = path.partition("/")
    if kind != "device" or not device or "/" in device:
        return None
    return domain, device
