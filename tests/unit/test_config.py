"""Configuration: typed, parsed once, every error naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load, render, set_value


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_config_gets_the_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path / "t.toml", '[device]\nid = "dev-1"\nstate_dir = "st"\n'))
    assert cfg.device.id == "dev-1"
    assert cfg.state_dir == tmp_path / "st"  # relative paths resolve against the file
    assert cfg.keys.backend == "file" and cfg.mqtt.keepalive == 60
    assert cfg.client_id == "dev-1" and cfg.topic_prefix == "dev-1"


@pytest.mark.parametrize("text,message", [
    ('[device]\nstate_dir = "x"\n', "[device] id is required"),
    ('[device]\nid = "d:1"\n', "contains ':'"),
    ('[device]\nid = "dev"\n[keys]\nbackend = "hsm"\n', "[keys] backend: 'hsm' is not one of file, tpm"),
    ('[device]\nid = "dev"\n[mqtt]\nkeepalive = "60"\n', "[mqtt] keepalive: expected integer, got str"),
    ('[device]\nid = "dev"\n[mqtt]\nkeepalive = true\n', "expected integer, got boolean"),
    ('[device]\nid = "dev"\n[mqtt]\nkeepalvie = 5\n', "[mqtt] keepalvie: unknown key"),
    ('[device]\nid = "dev"\n[mqtt]\nkeepalive = 1\n', "outside 5..65535"),
    ('[device]\nid = "dev"\n[brokers]\nx = 1\n', "unknown section [brokers]"),
    ('[device]\nid = "dev"\n[endpoints]\nurls = "mqtts://a:1"\n', "expected list of str"),
    ('[device\nid = "dev"\n', "not valid TOML"),
])
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "t.toml", text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config or set TETHER_CONFIG"):
        load(tmp_path / "absent.toml")


def test_dropins_override_in_sorted_order(tmp_path: Path) -> None:
    base = write(tmp_path / "t.toml", '[device]\nid = "dev-1"\n[mqtt]\nkeepalive = 60\n')
    write(tmp_path / "config.d" / "20-fleet.toml", "[mqtt]\nkeepalive = 30\n")
    write(tmp_path / "config.d" / "10-image.toml", "[mqtt]\nkeepalive = 90\nclient_id_prefix = \"d:\"\n")
    cfg = load(base)
    assert cfg.mqtt.keepalive == 30 and cfg.client_id == "d:dev-1"
    assert len(cfg.sources) == 3
    assert "keepalive = 30" in render(cfg)


def test_config_set_validates_and_keeps_the_old_value_on_error(tmp_path: Path) -> None:
    base = write(tmp_path / "t.toml", '[device]\nid = "dev-1"\n')
    set_value(base, "mqtt.keepalive", "45")
    assert load(base).mqtt.keepalive == 45
    with pytest.raises(ConfigError, match="keepalive"):
        set_value(base, "mqtt.keepalive", "2")
    assert load(base).mqtt.keepalive == 45
    with pytest.raises(ConfigError, match="is not a configuration key"):
        set_value(base, "mqtt.nope", "1")
    set_value(base, "endpoints.urls", '["mqtts://a:8883"]')
    assert load(base).endpoints.urls == ("mqtts://a:8883",)
