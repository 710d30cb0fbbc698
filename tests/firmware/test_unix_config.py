"""Every credential and tether.json problem stops the board with the one line docs/firmware.md
promises, on the real unix port, from the .mpy files and frozen into a 32-bit build (conftest's
``deploy``; no broker needed: it never gets that far).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lab.core import station_cli
from tests.firmware.unix_port import Deployment

GOOD = {"device_id": "fw-conf", "endpoints": ["mqtts://localhost:8883"], "topic_prefix": "fw-conf"}
HINT = "re-issue with `tether-station issue --format der`"


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("station")
    station_cli("init", "--dir", str(root / "station"), "--trust-domain", "conf.test")
    station_cli("issue", "fw-conf", "--format", "der", "--out", str(root / "creds"), "--dir", str(root / "station"))
    return root / "creds"


def _first_line(tmp_path: Path, deploy: Deployment, creds: Path, config: Any = GOOD,
                files: dict[str, bytes | None] | None = None) -> str:
    root = deploy.board_dir(tmp_path / "board", creds, {})
    (root / "tether.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for name, data in (files or {}).items():
        if data is None:
            (root / name).unlink()
        else:
            (root / name).write_bytes(data)
    board = deploy.board(root)
    assert board.wait_exit(30) == 0
    lines = board.output().splitlines()
    assert len(lines) == 1, lines
    prefix = "tether: cannot start: "
    assert lines[0].startswith(prefix), lines
    return lines[0][len(prefix):]


CONFIG_CASES = [
    ("{not json", "tether.json: not valid JSON"),
    ("[1]", "tether.json: expected a JSON object"),
    ({**GOOD, "keepalve": 5}, "tether.json: keepalve: unknown key (known: "),
    ({**GOOD, "k\u001b[2J": 5}, "tether.json: 'k\\x1b[2J': unknown key (known: "),  # escaped, not sent to the terminal
    ({**GOOD, "keepalive": "60"}, "tether.json: keepalive: expected int, got '60'"),
    ({**GOOD, "keepalive": 0}, "tether.json: keepalive: must be within 1..65535, got 0"),
    # bounds (issue 22 item 10): each of these used to pass load_config, then crash or hang the loop
    ({**GOOD, "keepalive": 70000}, "tether.json: keepalive: must be within 1..65535, got 70000"),
    ('{"device_id": "%s", "endpoints": ["mqtts://localhost:8883"]}' % ("x" * 100_000),
     "tether.json: larger than 4096 bytes"),
    ({**GOOD, "device_id": "x" * 65}, "tether.json: device_id: 65 characters, at most 64 allowed"),
    ({**GOOD, "device_id": "a/b"}, "tether.json: device_id: contains '/'; use letters, digits"),
    ({**GOOD, "device_id": "d:1"}, "tether.json: device_id: contains ':', which Cumulocity forbids"),
    ({**GOOD, "device_id": "tether-ota-service"},
     "tether.json: device_id: 'tether-ota-service' is reserved for a service identity"),
    ('{"device_id": "fw-conf", "endpoints": ["mqtts://localhost:8883"], "connect_timeout": 1e400}',
     "tether.json: connect_timeout: must be within 1..300, got inf"),
    ('{"device_id": "fw-conf", "endpoints": ["mqtts://localhost:8883"], "token_timeout": 1e400}',
     "tether.json: token_timeout: must be within 1..3600, got inf"),
    ({**GOOD, "heartbeat_interval": 10 ** 11},
     "tether.json: heartbeat_interval: must be within 1..86400, got 100000000000"),
    ('{"device_id": "fw-conf", "endpoints": ["mqtts://localhost:8883"], "backoff_cap": 1e400}',
     "tether.json: backoff_cap: must be within 1..86400, got inf"),
    ({**GOOD, "max_packet": 1 << 30}, "tether.json: max_packet: must be within 256..65536, got 1073741824"),
    ({**GOOD, "client_id_prefix": "d\u0000"}, "tether.json: client_id_prefix: contains '\\x00'; printable ASCII only"),
    ({**GOOD, "topic_prefix": "a\nb"}, "tether.json: topic_prefix: contains '\\n'; printable ASCII only"),
    ({**GOOD, "endpoints": [7]}, "tether.json: endpoints[0]: expected str, got 7"),
    ({**GOOD, "endpoints": ["mqtts://core1:8883"] * 9}, "tether.json: endpoints: 9 URLs, at most 8 allowed"),
    ({**GOOD, "heap_report": 1}, "tether.json: heap_report: expected bool, got 1"),
    ({**GOOD, "device_id": 7}, "tether.json: device_id: expected str, got 7"),
    ({"endpoints": GOOD["endpoints"]}, "tether.json: device_id: required (the certificate CN)"),
    ({**GOOD, "endpoints": []}, "tether.json: endpoints: at least one mqtts://host:port is required"),
    ({**GOOD, "endpoints": ["http://core1:8883"]}, 'tether.json: endpoints[0]: scheme must be mqtts://, got "http"'),
    ({**GOOD, "endpoints": ["mqtts://core1:99999"]}, "tether.json: endpoints[0]"),
    ({**GOOD, "backoff_base": 10, "backoff_cap": 5}, "tether.json: backoff_cap: must be >= backoff_base (10), got 5"),
]


@pytest.mark.parametrize(("config", "expected"), CONFIG_CASES, ids=[c[1][:40] for c in CONFIG_CASES])
def test_config_problem_is_one_line_naming_file_and_key(tmp_path: Path, deploy: Deployment, creds: Path,
                                                        config: Any, expected: str) -> None:
    assert _first_line(tmp_path, deploy, creds, config).startswith(expected)


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def test_missing_key_names_the_file(tmp_path: Path, deploy: Deployment, creds: Path) -> None:
    line = _first_line(tmp_path, deploy, creds, files={"device.key.der": None})
    assert line == "./device.key.der: missing; copy it from `tether-station issue --format der`"


def test_missing_ca_names_the_file(tmp_path: Path, deploy: Deployment, creds: Path) -> None:
    line = _first_line(tmp_path, deploy, creds, files={"ca.crt.der": None})
    assert line == "./ca.crt.der: missing; copy it from `tether-station issue --format der`"


def test_pem_certificate_is_reported_as_not_der(tmp_path: Path, deploy: Deployment, creds: Path) -> None:
    line = _first_line(tmp_path, deploy, creds, files={"device.crt.der": b"-----BEGIN CERTIFICATE-----\n"})
    assert line == "./device.crt.der: not DER (expected a SEQUENCE); PEM files must be converted"


def test_truncated_key_is_reported_as_truncated(tmp_path: Path, deploy: Deployment, creds: Path) -> None:
    key = (creds / "device.key.der").read_bytes()
    line = _first_line(tmp_path, deploy, creds, files={"device.key.der": key[:-10]})
    assert line.startswith("./device.key.der: corrupt or truncated: DER says")


def test_bytes_after_the_der_are_reported(tmp_path: Path, deploy: Deployment, creds: Path) -> None:
    ca = (creds / "ca.crt.der").read_bytes()
    line = _first_line(tmp_path, deploy, creds, files={"ca.crt.der": ca + b"\n"})
    assert line == "./ca.crt.der: corrupt: 1 bytes after the DER SEQUENCE"


def test_certificate_in_place_of_the_key_is_refused_by_the_tls_stack(
        tmp_path: Path, deploy: Deployment, creds: Path) -> None:
    cert = (creds / "device.crt.der").read_bytes()
    line = _first_line(tmp_path, deploy, creds, files={"device.key.der": cert})
    assert line == f"./device.key.der: the TLS stack cannot load it (invalid key); {HINT}"


def test_key_in_place_of_the_ca_names_the_ca_file(tmp_path: Path, deploy: Deployment, creds: Path) -> None:
    key = (creds / "device.key.der").read_bytes()
    line = _first_line(tmp_path, deploy, creds, files={"ca.crt.der": key})
    assert line == f"./ca.crt.der: the TLS stack cannot load it (invalid cert); {HINT}"


def test_corrupt_device_certificate_names_the_certificate(tmp_path: Path, deploy: Deployment, creds: Path) -> None:
    cert = (creds / "device.crt.der").read_bytes()
    line = _first_line(tmp_path, deploy, creds, files={"device.crt.der": _flip(cert, 8)})
    assert line.startswith("./device.crt.der: ")


# a heap that holds tether_main but not the setup (the .mpy files load their bytecode into it)
TOO_SMALL = {"mpy-64": "40K", "frozen-32": "12K"}


def test_a_heap_too_small_for_the_agent_is_one_line_not_a_traceback(
        tmp_path: Path, deploy: Deployment, creds: Path) -> None:
    root = deploy.board_dir(tmp_path / "board", creds, GOOD)
    board = deploy.board(root, heapsize=TOO_SMALL[deploy.name])
    assert board.wait_exit(30) == 0
    assert board.output().splitlines() == ["tether: cannot start: out of memory while loading"]
