"""`tether status --format prometheus` (issue 28 item 3, the device side): what node_exporter's textfile
collector reads, parsed with prometheus-client's own parser, for a device enrolled at a real station."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent.textfile import render
from provisioning.certs import load_certificates, serial_of
from tests.conftest import run_tether
from tests.station.conftest import RunningStation
from tests.station.test_enroll import device_config


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_an_enrolled_device_reports_its_certificate_expiry(tmp_path: Path, station: RunningStation) -> None:
    config = device_config(tmp_path, station, "prom-dev")
    before = run_tether("status", "--format", "prometheus", config=config)
    assert before.returncode == 0, before.stderr
    samples = parse(before.stdout)
    assert samples[("tether_device_info", (("device_id", "prom-dev"), ("key_backend", "file")))] == 1
    assert samples[("tether_certificate_present", ())] == 0
    assert not any(name == "tether_certificate_expiry_timestamp_seconds" for name, _ in samples)

    assert run_tether("enroll", config=config).returncode == 0
    samples = parse(run_tether("status", "--format", "prometheus", config=config).stdout)
    leaf = load_certificates((tmp_path / "prom-dev" / "state" / "certs" / "chain.pem").read_bytes())[0]
    assert samples[("tether_certificate_expiry_timestamp_seconds", (("serial", serial_of(leaf)),))] == \
        leaf.not_valid_after_utc.timestamp()
    assert samples[("tether_key_present", ())] == 1 and samples[("tether_certificate_present", ())] == 1


def test_session_state_is_one_hot_and_label_values_are_escaped() -> None:
    text = render({"device_id": 'we"ird\\id', "key": {"backend": "tpm", "present": True}, "chain": None,
                   "session": "online", "endpoint_errors": {"mqtts://a:8883": "refused"}, "updated_at": 1700000000,
                   "token": {"expires_at": 1700003600}})
    samples = parse(text)
    assert samples[("tether_device_info", (("device_id", 'we"ird\\id'), ("key_backend", "tpm")))] == 1
    assert {dict(labels)["state"]: v for (name, labels), v in samples.items() if name == "tether_session"} == {
        "booting": 0, "connecting": 0, "online": 1, "reconnecting": 0, "stopped": 0}
    assert samples[("tether_endpoint_errors", ())] == 1
    assert samples[("tether_token_expiry_timestamp_seconds", ())] == 1700003600
    assert samples[("tether_status_updated_timestamp_seconds", ())] == 1700000000
