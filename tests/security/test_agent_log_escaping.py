"""Issue 22, item 8: escape sequences from a `515` (or from what it leads to) reached the agent's log raw.

Two lines of defence, each tested on its own:
- the SmartREST parser (agent/core/smartrest.py, shared with the firmware) refuses control characters and
  bidirectional marks in any field, with an error naming the field;
- the agent's log handler escapes every record (provisioning.printable, installed once in agent/cli.py),
  so outside text the parser never sees (here a redirect's Location header) is written escaped too.

End to end: a real `tether run` on a real mosquitto, the operation published by the lab's service peer,
the agent's stderr log read from its file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.core import firmware_op, smartrest
from agent.core.errors import SmartRestError
from lab.mosquitto import Mosquitto
from lab.procs import wait_until
from lab.tokens import SERVICE_ID
from provisioning.printable import EscapeOutsideInput
from tests.agent_bed import Agent, provisioned_device
from tests.pki import Pki
from tests.security.conftest import Peer
from tests.security.test_artifact_hosts import Recorder, servers

__all__ = ["servers"]  # the fixture, imported for the tests below

RAW = ("\x1b", "\x9b", "\u202e", "\x07")  # ESC, CSI, right-to-left override, BEL: none may reach the log


@pytest.mark.parametrize(("line", "field", "code"), [
    ("515,dev-001,app,1.1.0\x1b[2J,https://h/fw", "515.version", "U+001B"),
    ("515,dev-001,\"app\u202egnp.exe\",1.1.0,https://h/fw", "515.name", "U+202E"),
    ("515,dev-001\x07,app,1.1.0,https://h/fw", "515.serial", "U+0007"),
    ("515,dev-001,app,1.1.0,https://h/\x9b31m", "515.url", "U+009B"),
    ("515,dev-001,app\u2066,1.1.0,https://h/", "515.name", "U+2066"),
    ("515,dev-001,app\u200f,1.1.0,https://h/", "515.name", "U+200F"),
    ("515,dev-001,app,1.1.0\t,https://h/", "515.version", "U+0009"),
    ("71,abc\x00.def.ghi", "71.token", "U+0000"),
    ("115,app,1.0,x\x85", "115 field 3", "U+0085"),
])
def test_the_smartrest_parser_refuses_control_and_bidi_characters_naming_the_field(line: str, field: str,
                                                                                   code: str) -> None:
    with pytest.raises(SmartRestError) as refused:
        smartrest.parse_line(line)
    assert refused.value.field == field and code in refused.value.reason, refused.value
    assert not any(raw in str(refused.value) for raw in RAW)


def test_the_parser_keeps_ordinary_text_including_non_latin_letters() -> None:
    assert firmware_op.parse_firmware_operation("515,dev-001,Prüfstand-Ω,1.1.0,https://h/fw?a=b").fields() == (
        "dev-001", "Prüfstand-Ω", "1.1.0", "https://h/fw?a=b")


def test_the_handler_filter_escapes_records_of_every_logger_and_tracebacks() -> None:
    handler = logging.StreamHandler()
    handler.addFilter(EscapeOutsideInput())
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    try:
        raise ValueError("bad \x1b[2J value")
    except ValueError as exc:
        record = logging.LogRecord("urllib3.connectionpool", logging.WARNING, __file__, 1, "%s to %s",
                                   (exc, "https://h/\x9b"), (type(exc), exc, exc.__traceback__))
    assert handler.filter(record)
    text = handler.format(record)
    assert "bad \\x1b[2J value to https://h/\\x9b" in text and "ValueError: bad \\x1b[2J value" in text, text
    assert not any(raw in text for raw in RAW)


@pytest.fixture
def running(tmp_path: Path, pki: Pki, broker: Mosquitto) -> Iterator[Agent]:
    slots = tmp_path / "slots"
    (slots / "slot-a").mkdir(parents=True)
    (slots / "slot-a" / "app").write_text("app factory\n")
    config = provisioned_device(tmp_path, pki, "dev-001", token={"enabled": False},
                                endpoints={"urls": [f"mqtts://localhost:{broker.port}"]},
                                ota={"slots": "directory", "slots_dir": str(slots), "ca_file": str(pki.ca_chain_file),
                                     "trust_anchor": str(pki.root_file), "artifact_hosts": ["127.0.0.1"],
                                     "download_timeout": 2.0, "download_attempts": 1})
    agent = Agent(config)
    try:
        agent.wait_status(session="online")
        yield agent
    finally:
        agent.stop()


def failures(cloud: Peer) -> list[str]:
    return [payload.decode() for topic, payload in cloud.received if topic == "dev-001/s/us"
            and payload.startswith(b"502,")]


def test_a_hostile_515_is_refused_by_field_and_nothing_raw_reaches_the_agent_log(
        running: Agent, peers: Callable[..., Peer], servers: Callable[..., Recorder]) -> None:
    cloud = peers(SERVICE_ID)
    cloud.subscribe("dev-001/s/us")
    cloud.publish("dev-001/s/ds", "515,dev-001,app,1.1.0\x1b]0;owned\x07\x1b[2J\u202e,https://127.0.0.1/".encode())
    wait_until(lambda: failures(cloud), 20, "a 502 for the hostile operation",
               describe=lambda: f"upstream {cloud.received}; log:\n{running.log()}")
    [refusal] = failures(cloud)
    assert "malformed firmware operation: 515.version: control character U+001B" in refusal, refusal

    # fields that pass the parser, and a server that answers with an escape sequence in its redirect
    trusted = servers("127.0.0.1", redirect_to="https://127.0.0.1:1/\x1b[2J\x1b]0;owned\x07")
    cloud.publish("dev-001/s/ds", f"515,dev-001,app,1.1.0,{trusted.url('app/1.1.0/')}".encode())
    wait_until(lambda: len(failures(cloud)) == 2, 20, "a 502 for the redirect to a hostile URL",
               describe=lambda: f"upstream {cloud.received}; log:\n{running.log()}")
    assert "a control character (U+001B) is not allowed" in failures(cloud)[1], failures(cloud)

    log = running.log()
    assert "refused a malformed firmware operation: 515.version" in log, log
    [redirected] = [line for line in log.splitlines() if "redirected to" in line]
    shown = "https://127.0.0.1:1/\\x1b[2J\\x1b]0;owned\\x07/app/1.1.0/manifest.json"  # the Location, escaped
    assert redirected.endswith(f"redirected to {shown}"), redirected
    for raw in RAW:
        assert raw not in log, f"{raw!r} reached the agent log raw"
