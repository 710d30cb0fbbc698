"""One device-id rule for the Linux agent and the board: provisioning/identity.py's check_device_id, as a
device applies it to the id it already holds (`carried_by=()`), and the firmware's
board_config.device_id_problem (MicroPython has neither the station's package nor f-strings in its
path) give the same verdict on one table of ids, tests/firmware/vectors/device_ids.json, in CPython and
in real MicroPython. The station, which gives ids out, refuses more: what a supported broker cannot
carry (a '.' on RabbitMQ, issue 26)."""

import json
import os

import board_config
import pytest

from provisioning import ProvisioningError
from provisioning.identity import BROKERS, RESERVED_IDS, check_device_id
from tests.firmware import micropython

TABLE = os.path.join(micropython.HERE, "vectors", "device_ids.json")
with open(TABLE) as _f:
    CASES = json.load(_f)


def _accepts(device_id, carried_by):
    try:
        check_device_id(device_id, carried_by=carried_by)
    except ProvisioningError:
        return False
    return True


@pytest.mark.parametrize("case", CASES, ids=[repr(c["id"])[:30] for c in CASES])
def test_the_agent_and_the_board_agree_on_each_id(case):
    assert _accepts(case["id"], carried_by=()) is case["ok"]
    assert (board_config.device_id_problem(case["id"]) is None) is case["ok"]


@pytest.mark.parametrize("case", [c for c in CASES if c["ok"]], ids=[repr(c["id"])[:30] for c in CASES if c["ok"]])
def test_the_station_gives_out_only_ids_every_supported_broker_carries(case):
    assert _accepts(case["id"], carried_by=BROKERS) is ("." not in case["id"])


def test_the_board_reserves_the_same_service_ids():
    assert tuple(board_config.RESERVED_IDS) == tuple(RESERVED_IDS)


def test_the_board_rule_gives_the_same_verdicts_in_micropython():
    script = (
        "import json, board_config\n"
        "cases = json.load(open('/vectors/device_ids.json'))\n"
        "got = [board_config.device_id_problem(c['id']) is None for c in cases]\n"
        "print('@@RESULT ' + json.dumps({'got': got}))\n"
    )
    got = micropython.run(script, {"/vectors/device_ids.json": TABLE})["got"]
    assert got == [c["ok"] for c in CASES]
