"""Errors of the device agent."""

from __future__ import annotations

from hal import TetherError


class AgentError(TetherError):
    """The agent cannot do what was asked; the message says why and what to do."""


class ConfigError(AgentError):
    """A configuration file is wrong: the message names the file, the key and the reason."""


class OutboxError(AgentError):
    """A message could not be queued (or the store could not be used); the message says why."""


class OutboxFull(OutboxError):
    """The outbox is at its cap and `[outbox] policy = "refuse-new"`."""
