"""MQTT topic names and client id for the Cumulocity SmartREST 2.0 dialect (DESIGN.md "MQTT dialect").

On the platform the topics are bare (``s/us``); in the lab each device's topics sit under its
own id (``<id>/s/us``) so the broker's pattern ACL can keep devices apart.
"""

from agent.core.errors import ParameterError, describe


def check_topic_part(value, field):
    """Return ``value`` if it can sit in a topic name: text without MQTT wildcards (``+ #``), NUL or
    a leading or trailing ``/``; ParameterError naming ``field`` otherwise."""
    if not isinstance(value, str):
        raise ParameterError(field, "expected text, got %s" % describe(value))
    if "+" in value or "#" in value or "\x00" in value:
        raise ParameterError(field, "must not contain the MQTT wildcards + # or NUL, got %s" % describe(value))
    if value.startswith("/") or value.endswith("/"):
        raise ParameterError(field, "must not start or end with /, got %s" % describe(value))
    return value


class Topics:
    """Every topic the device uses, under an optional ``prefix``: the one owner of topic names.

    ``token_request`` and ``token_response`` are the names of the token topics under the prefix
    (``[token] request_topic`` / ``response_topic``; Cumulocity: ``s/uat`` and ``s/dat``).
    """

    def __init__(self, prefix="", token_request="s/uat", token_response="s/dat"):  # noqa: S107 (topics)
        self.prefix = check_topic_part(prefix, "mqtt.topic_prefix")
        if not check_topic_part(token_request, "token.request_topic"):
            raise ParameterError("token.request_topic", "must not be empty")
        if not check_topic_part(token_response, "token.response_topic"):
            raise ParameterError("token.response_topic", "must not be empty")
        self.token_request = self.topic(token_request)
        self.token_response = self.topic(token_response)
        self.downstream = self.topic("s/ds")
        self.upstream = self.topic("s/us")

    def topic(self, name):
        """``name`` under the prefix."""
        return self.prefix + "/" + name if self.prefix else name


def client_id(device_id, prefix):
    """The MQTT client id ``<prefix><device_id>`` (the prefix's default is defaults.CLIENT_ID_PREFIX:
    Cumulocity wants ``d:``); ParameterError for an empty id or one with ``:``
    (the device id is the certificate CN, which DESIGN.md forbids ``:`` in)."""
    if not isinstance(device_id, str) or not device_id:
        raise ParameterError("device_id", "expected a non-empty id, got %s" % describe(device_id))
    if ":" in device_id:
        raise ParameterError("device_id", "must not contain ':', got %s" % describe(device_id))
    return prefix + device_id
