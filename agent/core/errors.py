"""Errors raised by agent/core: one root, one subclass per concern.

Every error carries ``field`` (what was wrong, as a path such as ``claims.exp`` or
``GGGroups[0].Cores[1].Connectivity[0].PortNumber``) and ``reason`` (why), and its message is
``"<field>: <reason>"``. They derive from ValueError because each one means "this input is bad";
callers that retry decide from the subclass, never from the message text.
"""


class CoreError(ValueError):
    """Bad input to pure core logic; ``field`` names where, ``reason`` says what was expected."""

    def __init__(self, field, reason):
        super().__init__("%s: %s" % (field, reason))
        self.field = field
        self.reason = reason


class TokenError(CoreError):
    """A JWT that cannot be used: malformed, undecodable claims, or absurd timing."""


class SmartRestError(CoreError):
    """A SmartREST 2.0 line that does not parse, or a field that cannot be formatted."""


class EndpointError(CoreError):
    """An endpoint URL, discovery document or rotation request that is not acceptable."""


class ParameterError(CoreError):
    """A parameter handed to core logic (backoff bounds, topic prefix) that is out of range.

    Not named ConfigError: that is agent.errors.ConfigError, a configuration file that is wrong. The
    agent turns a ParameterError from its config into a ConfigError naming the file, section and key.
    """



def describe(value, limit=40):
    """Render ``value`` for an error message: JSON-like, truncated to ``limit`` characters.

    Strings come out quoted (``"x"``) so ``got "8883"`` and ``got 8883`` read differently.
    """
    if isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif value is None:
        text = "null"
    elif value is True:
        text = "true"
    elif value is False:
        text = "false"
    elif isinstance(value, dict):
        text = "an object"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
