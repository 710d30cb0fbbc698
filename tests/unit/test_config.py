"""Configuration: typed, parsed once, every error naming the file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, Threshold, load, parse_threshold
from agent.config_edit import render, set_value


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_config_gets_the_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path / "t.toml", '[device]\nid = "dev-1"\nstate_dir = "st"\n'))
    assert cfg.device.id == "dev-1"
    assert cfg.state_dir == str(tmp_path / "st")  # relative paths resolve against the file
    assert cfg.keys.backend == "file" and cfg.mqtt.keepalive == 60
    assert cfg.client_id == "dev-1" and cfg.topic_prefix == "dev-1"


@pytest.mark.parametrize("text,message", [
    ('[device]\nstate_dir = "x"\n', "[device] id is required"),
    ('[device]\nid = "d:1"\n', "contains ':'"),
    ('[device]\nid = "dev"\n[keys]\nbackend = "hsm"\n', "[keys] backend: unknown key backend 'hsm'"),
    ('[device]\nid = "dev"\n[mqtt]\nkeepalive = "60"\n', "[mqtt] keepalive: expected integer, got str"),
    ('[device]\nid = "dev"\n[mqtt]\nkeepalive = true\n', "expected integer, got boolean"),
    ('[device]\nid = "dev"\n[mqtt]\nkeepalvie = 5\n', "[mqtt] keepalvie: unknown key"),
    ('[device]\nid = "dev"\n[ota]\nslots = "swupdate"\ninstal_command = "swupdate -i {file}"\n',
     "[ota] instal_command: unknown key"),  # a misspelt slot option is refused, not swallowed (issue 23 item 6)
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


@pytest.mark.parametrize("section,text,message", [
    ("mqtt", 'topic_prefix = "a/+"', "[mqtt] topic_prefix: must not contain the MQTT wildcards + #"),
    ("mqtt", 'topic_prefix = "fleet/#"', "[mqtt] topic_prefix: must not contain the MQTT wildcards"),
    ("mqtt", 'topic_prefix = "/lead"', "[mqtt] topic_prefix: must not start or end with /"),
    ("token", 'request_topic = "s/+"', "[token] request_topic: must not contain the MQTT wildcards"),
    ("token", 'response_topic = ""', "[token] response_topic: must not be empty"),
    ("token", "timeout = 0", "[token] timeout: must be > 0"),
    ("renewal", 'threshold = "bogus"', "[renewal] threshold: 'bogus' is neither a lifetime percentage"),
    ("renewal", 'threshold = "100%"', "[renewal] threshold: lifetime percentage must be between 0 and 100"),
    ("renewal", 'threshold = "0d"', "[renewal] threshold: time before expiry must be positive"),
    ("renewal", "retry = -1.0", "[renewal] retry: must be > 0"),
    ("est", 'url = "http://station:8443"', "[est] url: 'http://station:8443': only https:// is fetched, got http://"),
    ("discovery", 'url = "https://:8443"', "[discovery] url: 'https://:8443': the URL names no host"),
    ("discovery", 'url = "https://h:99999"', "'https://h:99999': port '99999' is not a number 1..65535"),
    ("endpoints", 'urls = ["mqtts://a:1", "tcp://b"]', "[endpoints] urls: urls[1]"),
])
def test_values_are_parsed_at_load_and_errors_name_the_file_that_set_them(
        tmp_path: Path, section: str, text: str, message: str) -> None:
    base = write(tmp_path / "t.toml", '[device]\nid = "dev"\n')
    dropin = write(tmp_path / "config.d" / "50-fleet.toml", f"[{section}]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load(base)
    assert message in str(info.value)
    assert str(info.value).startswith(f"{dropin}: ")  # the drop-in that set the key, not the base file


def test_threshold_is_a_value_after_load(tmp_path: Path) -> None:
    cfg = load(write(tmp_path / "t.toml", '[device]\nid = "dev"\n[renewal]\nthreshold = "30d"\n'))
    assert cfg.renewal_threshold.before == 30 * 86400
    assert cfg.topics.token_request == "dev/s/uat"


@pytest.mark.parametrize("command", [["check"], ["status"], ["config", "show"], ["run"]])
def test_cli_turns_a_config_error_into_one_line_and_exit_1(tmp_path: Path, command: list[str]) -> None:
    from tests.conftest import run_tether

    path = write(tmp_path / "t.toml", '[device]\nid = "dev"\nstate_dir = "st"\n[mqtt]\ntopic_prefix = "a/+"\n')
    done = run_tether(*command, config=path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"tether: configuration error: {path}: [mqtt] topic_prefix: must not contain")


def test_cli_prints_a_multi_line_error_on_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_tether
    from tests.pki import Pki

    pki = Pki.create(tmp_path / "pki")
    path = write(tmp_path / "t.toml",
                 f'[device]\nid = "dev-001"\nstate_dir = "st"\n[identity]\nca_file = "{pki.root_file}"\n')
    assert run_tether("keygen", config=path).returncode == 0
    chain, _ = pki.device_files("other-device")  # another device's certificate for another key
    done = run_tether("chain", "install", str(chain), config=path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "rule(s) broken: certificate" in done.stderr  # the policy's list of violations, joined
    assert done.stderr.count("\n") == 1, done.stderr


THRESHOLD_RE = r"\s*(\d+(?:\.\d+)?)\s*(%|[smhd])\s*"  # what parse_threshold accepted before it parsed by hand


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=" \t\n0123456789.%smhdx\u0663\u00a0-+e_", max_size=8))
def test_the_threshold_parser_accepts_what_its_regular_expression_did(text: str) -> None:
    match = re.fullmatch(THRESHOLD_RE, text)
    try:
        threshold = parse_threshold(text)
    except ConfigError as exc:
        assert match is None or "between 0 and 100" in str(exc) or "must be positive" in str(exc), text
        return
    assert match is not None, text
    value, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        assert threshold == Threshold(share=value / 100)
    else:
        assert threshold == Threshold(before=value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def test_an_absolute_path_is_kept_as_written_and_a_relative_one_resolved(tmp_path: Path) -> None:
    # an absolute path is the operator's choice, link and all (a symlink may be switched later on purpose);
    # a relative one is made absolute against the file's directory, links resolved as before
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cfg = load(write(tmp_path / "link" / "t.toml",
                     f'[device]\nid = "dev-1"\nstate_dir = "st"\n[identity]\nca_file = "{tmp_path}/link/ca.pem"\n'))
    assert cfg.identity.ca_file == f"{tmp_path}/link/ca.pem"
    assert cfg.state_dir == str(tmp_path / "real" / "st")
