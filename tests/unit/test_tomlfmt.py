"""The one TOML writer: what it renders reads back unchanged with tomllib, for the device's config files
and the station's station.toml alike."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest

from provisioning.tomlfmt import format_value, to_toml

NASTY = ['plain', 'with "quotes"', "back\\slash\\", "C:\\path\\n", "line\none", "tab\tand\rcr",
         "bell\x07 nul\x00 esc\x1b del\x7f unit\x1f", "form\ffeed\bback", "ünïcødé ✓", "'single'", '"""', ""]


@pytest.mark.parametrize("text", NASTY)
def test_strings_read_back_unchanged(text: str) -> None:
    assert tomllib.loads(f"v = {format_value(text)}")["v"] == text


def test_a_config_with_every_kind_of_value_reads_back_unchanged() -> None:
    sections = {
        "device": {"id": "dev-1", "state_dir": "/var/lib/tether", "note": "a\nb\t\"c\"\\d\x01"},
        "endpoints": {"urls": ["mqtts://a:8883", 'mqtts://"b":1'], "allow_unlikely": True, "empty": []},
        "mqtt": {"keepalive": 60, "backoff_base": 0.5, "backoff_cap": 1e-7, "big": 1e300,
                 "connect_timeout": 10.0, "on": False, "negative": -3},
        "odd keys": {"a.b": 1, "with space": "x", "": "empty key"},
    }
    back = tomllib.loads(to_toml(sections, "a comment\nover two lines"))
    assert back == sections


def test_floats_keep_their_value_and_type() -> None:
    for value in (0.1, 1.0, -2.5e-10, 123456789.125, 1e22):
        back = tomllib.loads(f"v = {format_value(value)}")["v"]
        assert isinstance(back, float) and back == value
    assert tomllib.loads(f"v = {format_value(float('inf'))}")["v"] == math.inf
    assert math.isnan(tomllib.loads(f"v = {format_value(float('nan'))}")["v"])


def test_a_value_no_config_holds_is_refused() -> None:
    with pytest.raises(TypeError, match="NoneType"):
        format_value(None)


def test_agent_config_render_round_trips_through_its_own_loader(tmp_path: Path) -> None:
    from agent.config import load
    from agent.config_edit import render

    path = tmp_path / "t.toml"
    path.write_text(to_toml({"device": {"id": "dev-1", "state_dir": "st"},
                             "ota": {"restart_command": 'sh -c "echo \\"done\\"\nreboot"'}}))
    config = load(path)
    again = tmp_path / "again.toml"
    again.write_text(render(config))
    assert load(again) == config._replace(sources=(str(again),))


def test_station_settings_round_trip_quotes_backslashes_and_newlines(tmp_path: Path) -> None:
    from provisioning.station.ca import Settings

    settings = Settings(bootstrap_ca='C:\\factory\\"boot"\nca.pem', reserved_ids="a,b\tc", encrypted_keys=True,
                        device_days=30)
    path = tmp_path / "station.toml"
    path.write_bytes(settings.render())
    assert Settings.read(path) == settings
    assert tomllib.loads(path.read_text()) == dataclasses.asdict(settings)
