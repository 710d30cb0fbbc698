"""MQTT topic names and client id for the Cumulocity SmartREST 2.0 dialect (DESIGN.md "MQTT dialect").

On the platform the topics are bare (``s/us``); in the lab each device's topics sit under its
own id (``<id>/s/us``) so the broker's pattern ACL can keep devices apart.
"""

from agent.core.errors import ConfigError, describe

DEFAULT_CLIENT_ID_PREFIX = "d:"


class Topics:
    """Topic names under an optional ``prefix`` (no wildcards, no leading or trailing ``/``)."""

    def __init__(self, prefix=""):
        if not isinstance(prefix, str):
            raise ConfigError("mqtt.topic_prefix", "expected text, got %s" % describe(prefix))
        if "+" in prefix or "#" in prefix or "\x00" in prefix:
            raise ConfigError("mqtt.topic_prefix", "must not contain + # or NUL, got %s" % describe(prefix))
        if prefix.startswith("/") or prefix.endswith("/"):
            raise ConfigError("mqtt.topic_prefix", "must not start or end with /, got %s" % describe(prefix))
        self.prefix = prefix
        self.token_request = self._topic("s/uat")
        self.token_response = self._topic("s/dat")
        self.downstream = self._topic("s/ds")
        self.upstream = self._topic("s/us")

    def _topic(self, name):
        return self.prefix + "/" + name if self.prefix else name


def client_id(device_id, prefix=DEFAULT_CLIENT_ID_PREFIX):
    """The MQTT client id ``<prefix><device_id>``; ConfigError for an empty id or one with ``:``
    (the device id is the certificate CN, which DESIGN.md forbids ``:`` in)."""
    if not isinstance(device_id, str) or not device_id:
        raise ConfigError("device_id", "expected a non-empty id, got %s" % describe(device_id))
    if ":" in device_id:
        raise ConfigError("device_id", "must not contain ':', got %s" % describe(device_id))
    return prefix + device_id
