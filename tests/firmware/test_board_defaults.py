"""firmware/board_config.py takes the settings a board shares with `tether run` from agent/core/defaults.py."""

import io
import json

import board_config
import pytest

from agent.config import Config
from agent.core import defaults
from agent.core.errors import ParameterError


def _load(local):
    return board_config.load_config("tether.json", opener=lambda path: io.StringIO(json.dumps(local)))


GOOD = {"device_id": "dev1", "endpoints": ["mqtts://core1"]}


def test_shared_settings_default_to_the_agents():
    config = _load(GOOD)
    agent = Config()
    assert config["keepalive"] == defaults.KEEPALIVE == agent.mqtt.keepalive
    assert config["backoff_base"] == defaults.BACKOFF_BASE == agent.mqtt.backoff_base
    assert config["backoff_cap"] == defaults.BACKOFF_CAP == agent.mqtt.backoff_cap
    assert config["connect_timeout"] == defaults.CONNECT_TIMEOUT == agent.mqtt.connect_timeout
    assert config["token_timeout"] == defaults.TOKEN_TIMEOUT == agent.token.timeout
    assert config["client_id_prefix"] == defaults.CLIENT_ID_PREFIX == agent.mqtt.client_id_prefix
    assert config["topic_prefix"] == defaults.TOPIC_PREFIX == agent.mqtt.topic_prefix
    assert config["heartbeat_interval"] == defaults.HEARTBEAT_INTERVAL


def test_seconds_may_be_fractional_but_keepalive_is_whole():
    assert _load({**GOOD, "backoff_base": 0.5 + 1, "token_timeout": 2})["backoff_base"] == 1.5
    with pytest.raises(ParameterError, match="token_timeout: expected number, got '5'"):
        _load({**GOOD, "token_timeout": "5"})
    with pytest.raises(ParameterError, match=r"keepalive: expected int, got 1\.5"):
        _load({**GOOD, "keepalive": 1.5})
    with pytest.raises(ParameterError, match="backoff_cap: must be >= backoff_base"):
        _load({**GOOD, "backoff_base": 3, "backoff_cap": 2.5})


def test_topic_prefix_id_is_the_device_id():
    import board_setup

    topics, client_id = board_setup.parse_config(_load(GOOD))
    assert topics.downstream == "dev1/s/ds"
    assert client_id == "dev1"
